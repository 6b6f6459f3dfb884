"""The Triton Python-backend models. Each version folder's `model.py` is one line that imports a class
from here, so the serving logic is ordinary, tested package code:

    OnnxModel         a network from its ONNX file on ONNX Runtime (cpu target); batches every queued
                      request of equal shapes into one run (the UNet's dynamic batching)
    PreprocessModel   decodes and validates the request (same checks as the in-process pipeline)
    PersonalizeModel  BLS: PigeonPipeline.personalize over the mask_generator, condition_adapter and
                      personalizer models
    DenoiseModel      BLS: PigeonPipeline.denoise, the sampler loop with CFG over the unet model
                      (and vae_encoder first when the request's strength is below 1)
    PostprocessModel  PNG encoding and the stage timings

Per-request failures become that request's error response, naming the problem, with a status code by
cause (`error_response`): the client's bad input is INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT), a
component that failed passes its own code up through BLS and the ensemble, a request stopped at its
deadline (`timeout_ms`, `pigeon.core.deadline`) or by its client's hang-up is UNAVAILABLE (HTTP 503),
anything else is INTERNAL (500): load balancers and retry policies read 500 as the server's fault.
A request refused by admission (`ServingConfig.max_in_flight`, `pigeon.serving.in_flight`) is
UNAVAILABLE too: the server is full, retry later or elsewhere.
The model keeps serving.
No torch is imported here (each Python model process stays small).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pigeon.checkpoint import load_config, verify_pipeline_files
from pigeon.core.deadline import Deadline, DeadlineExceeded
from pigeon.core.images import ImageError, encode_png, load_image, to_model_input, to_uint8
from pigeon.export.variants import with_sampling_defaults
from pigeon.inference.pipeline import (
    GenerationRequest,
    PersonalizeInput,
    PigeonPipeline,
    RequestError,
    check_request,
    codes_to_tokens,
    reference_start,
    request_streams,
)
from pigeon.inference.runners import OrtOptions, OrtRunner
from pigeon.interface import FORWARDED, PARAMETERS, RequestParameter, parameters_read_by
from pigeon.serving.in_flight import InFlightSlots, ServerBusy, slots_path
from pigeon.serving.triton_config import IN_PROCESS, in_process_key
from pigeon.specs import component_specs
from pigeon.vocab import TextTokenizer

PIPELINE_DIR = "pipeline"  # the checkpoint's configs and tokenizer inside each version folder


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


class BlsError(RuntimeError):
    """A model called through BLS answered with an error; `code` is its TritonError code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


BAD_INPUT = (RequestError, ImageError, ValueError)  # the client's request: INVALID_ARG


def error_response(exc: Exception, prefix: str = ""):
    """The InferenceResponse for a failed request, its status code chosen by the cause."""
    pb = _pb()
    if isinstance(exc, BAD_INPUT):
        code = pb.TritonError.INVALID_ARG
    elif isinstance(exc, (DeadlineExceeded, ServerBusy)):  # budget passed, client left, or full
        # UNAVAILABLE, not CANCELLED: Triton's HTTP front end answers CANCELLED with 400, which
        # tells a client not to retry; 503 (and gRPC UNAVAILABLE) says "later, or elsewhere"
        code = pb.TritonError.UNAVAILABLE
    elif isinstance(exc, BlsError) and exc.code is not None:
        code = exc.code
    else:
        code = pb.TritonError.INTERNAL
    return pb.InferenceResponse(error=pb.TritonError(f"{prefix}{exc}", code))


class BlsRunner:
    """The runner interface over Triton's business-logic scripting: `run` sends one request."""

    name = "triton-bls"

    def __init__(self, config: Any) -> None:
        self.specs = component_specs(config)

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb = _pb()
        spec = self.specs[component]
        inputs = []
        for t in spec.inputs:
            value = np.ascontiguousarray(feeds[t.name])
            if len(t.shape) == 1:  # (batch,) travels as (batch, 1): Triton needs one dim per input
                value = value.reshape(-1, 1)
            inputs.append(pb.Tensor(t.name, value))
        request = pb.InferenceRequest(
            model_name=component, inputs=inputs, requested_output_names=spec.output_names
        )
        response = request.exec()
        if response.has_error():
            error = response.error()
            raise BlsError(f"{component}: {error.message()}", error.code())
        return {n: pb.get_output_tensor_by_name(response, n).as_numpy() for n in spec.output_names}


def verify_version_files(folder: Path, name: str) -> dict:
    """Refuse to load a network whose files differ from the version's manifest (SHA-256)."""
    from pigeon.export.errors import ManifestError
    from pigeon.files import hash_mismatch

    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ManifestError(f"{manifest_path}: missing; publish with `pigeon export all`")
    entry = json.loads(manifest_path.read_text())["components"][name]
    problem = hash_mismatch(folder, entry["files"], "the manifest")
    if problem:
        raise ManifestError(problem)
    return entry


def version_manifest(version_dir: Path) -> dict:
    """The manifest published with this version (every network's version folder holds a copy)."""
    from pigeon.export.errors import ManifestError

    for path in sorted(version_dir.parent.parent.glob(f"*/{version_dir.name}/manifest.json")):
        return json.loads(path.read_text())
    raise ManifestError(
        f"no manifest.json for version {version_dir.name} in {version_dir.parent.parent}"
    )


class _Model:
    """Shared plumbing: version folder, config parsing, one response per request, error responses."""

    def initialize(self, args: dict[str, str]) -> None:
        self.model_config = json.loads(args["model_config"])
        self.version_dir = Path(args["model_repository"]) / args["model_version"]
        self.output_dtypes = {o["name"]: o["data_type"] for o in self.model_config["output"]}
        # the admission slots of the whole repository (<repository>/<model>/<version>)
        self.in_flight = InFlightSlots(slots_path(self.version_dir.parent.parent))
        self.setup()

    def setup(self) -> None:  # pragma: no cover - overridden
        pass

    def pipeline_files(self) -> tuple[Any, TextTokenizer]:
        folder = self.version_dir / PIPELINE_DIR
        # the configs and tokenizer, checked against the version's manifest before use
        manifest = version_manifest(self.version_dir)
        verify_pipeline_files(folder, manifest["checkpoint_sha256"])
        # the export variant's sampling defaults (pigeon.export.variants) over the checkpoint's
        config = with_sampling_defaults(load_config(folder), manifest)
        tokenizer = TextTokenizer.load(
            folder / "tokenizer" / "tokenizer.json", config.personalizer.text_vocab_size
        )
        return config, tokenizer

    def execute(self, requests: list) -> list:
        pb = _pb()
        responses = []
        for request in requests:
            try:
                outputs = self.handle(request)
                responses.append(
                    pb.InferenceResponse(
                        [pb.Tensor(name, value) for name, value in outputs.items()]
                    )
                )
            except Exception as exc:  # one request's failure never stops the others
                responses.append(error_response(exc))
        return responses

    def handle(self, request: Any) -> dict[str, np.ndarray]:  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def get(request: Any, name: str) -> np.ndarray | None:
        tensor = _pb().get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def deadline(self, request: Any, timeout_ms: int) -> Deadline:
        """The request's deadline: `timeout_ms` from its arrival at preprocess, or Triton's own
        cancellation where the client's hang-up reached it first."""
        received_s = float(self.get(request, "received_s").reshape(-1)[0])
        return Deadline.after(timeout_ms, received_s, request.is_cancelled)

    def parameters(self, request: Any, reader: str) -> dict[str, Any]:
        """{name: value} of the checked request parameters that `reader` takes (preprocess has
        checked and defaulted them, so each is present)."""
        return {
            p.name: _parameter(self.get(request, p.name), p) for p in parameters_read_by(reader)
        }

    def release_slot(self, request: Any) -> None:
        """Give back the request's admission slot (none: token 0, or no such input in a config
        generated before admission existed)."""
        token = self.get(request, "in_flight_token")
        if token is not None:
            self.in_flight.release(int(token.reshape(-1)[0]))

    def finalize(self) -> None:
        pass


def _parameter(value: np.ndarray | None, parameter: RequestParameter) -> Any:
    """A request parameter as sent (None: not sent) -> its Python value; check_request judges it."""
    if value is None:
        return None
    if value.size != 1:
        raise RequestError(f"{parameter.name} must hold one value, got shape {value.shape}")
    if parameter.dtype == "bytes":
        return _text(value, parameter.name)
    return parameter.python_type(value.reshape(-1)[0])


def _text(value: np.ndarray, name: str) -> str:
    raw = value.reshape(-1)[0]
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None


class OnnxModel(_Model):
    def setup(self) -> None:
        verify_version_files(self.version_dir, self.model_config["name"])
        # the serving config's ONNX Runtime settings, as generated into config.pbtxt
        options = OrtOptions.from_parameters(self.model_config.get("parameters", {}))
        name = self.model_config["name"]
        self.session = options.for_component(name).session(self.version_dir / "model.onnx")
        self.input_names = [i["name"] for i in self.model_config["input"]]
        # ONNX rank per input: a (batch,) tensor arrives as (batch, 1) and is flattened back
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o["name"] for o in self.model_config["output"]]

    def _as_declared(self, name: str, value: np.ndarray) -> np.ndarray:
        if value.ndim == self.input_ranks[name] + 1 and value.shape[-1] == 1:
            return value.reshape(value.shape[:-1])
        return value

    def execute(self, requests: list) -> list:
        """Run every group of requests with equal non-batch shapes as one batch, then split."""
        pb = _pb()
        inputs = [
            {n: self._as_declared(n, self.get(r, n)) for n in self.input_names} for r in requests
        ]
        groups: dict[tuple, list[int]] = {}
        for i, feeds in enumerate(inputs):
            key = tuple(feeds[n].shape[1:] for n in self.input_names)
            groups.setdefault(key, []).append(i)
        responses: list = [None] * len(requests)
        for members in groups.values():
            sizes = [inputs[i][self.input_names[0]].shape[0] for i in members]
            batch = {n: np.concatenate([inputs[i][n] for i in members]) for n in self.input_names}
            try:
                outputs = self.session.run(self.output_names, batch)
            except Exception as exc:  # ONNX Runtime raises its own exception types
                for i in members:
                    responses[i] = error_response(
                        RuntimeError(str(exc)), f"{self.model_config['name']}: "
                    )
                continue
            bounds = np.cumsum([0] + sizes)
            for k, i in enumerate(members):
                responses[i] = pb.InferenceResponse(
                    [
                        pb.Tensor(n, np.ascontiguousarray(o[bounds[k] : bounds[k + 1]]))
                        for n, o in zip(self.output_names, outputs, strict=True)
                    ]
                )
        return responses


class PreprocessModel(_Model):
    def setup(self) -> None:
        self.config, _ = self.pipeline_files()
        parameters = self.model_config.get("parameters", {})
        self.max_in_flight = int(parameters.get("max_in_flight", {}).get("string_value", 0))
        self.lease_ms = int(parameters.get("in_flight_lease_ms", {}).get("string_value", 0))

    def admit(self, timeout_ms: int) -> int:
        """An admission slot's token (`ServerBusy` when the server holds max_in_flight requests);
        0 without a limit. The slot lasts the request's own budget, else the configured lease."""
        if not self.max_in_flight:
            return 0
        lease_ms = timeout_ms or self.lease_ms
        return self.in_flight.acquire(self.max_in_flight, lease_ms / 1000)

    def handle(self, request: Any) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        received_s = time.time()
        history_bytes = self.get(request, "history_images")
        if history_bytes is None or history_bytes.size == 0:
            raise RequestError("history is empty; give at least one image")
        max_history = self.config.personalizer.max_history
        if history_bytes.size > max_history:
            raise RequestError(
                f"history has {history_bytes.size} images, more than the configured "
                f"maximum of {max_history}"
            )
        history = [
            load_image(bytes(b), f"history[{i}]") for i, b in enumerate(history_bytes.reshape(-1))
        ]
        reference = load_image(
            bytes(self.get(request, "reference_image").reshape(-1)[0]), "reference"
        )
        checked = check_request(
            self.config,
            GenerationRequest(
                history=history,
                reference=reference,
                text=_text(self.get(request, "text"), "text"),
                **{
                    p.name: value
                    for p in PARAMETERS
                    if (value := _parameter(self.get(request, p.name), p)) is not None
                },
            ),
        )
        size = self.config.history_encoder.image_size
        outputs = {
            # (1, N, 3, S, S): one user, the leading 1 is personalize's batch dimension
            "history_pixels": np.stack([to_model_input(h, size) for h in checked.history])[None],
            "reference_pixels": to_model_input(checked.reference, size)[None],
            "reference_image_pixels": reference_start(
                self.config,
                checked.reference,
                checked.history,
                checked.strength,
                checked.style_start,
            )[None],
            "text_out": np.array([checked.text.encode("utf-8")], dtype=np.object_),
            **{f"{p.name}_out": p.to_array(getattr(checked, p.name)) for p in FORWARDED},
            "received_s": np.array([received_s]),
        }
        # admitted last: a bad request is named as such (400) whatever the load, and nothing after
        # this line can fail with the slot held
        outputs["in_flight_token"] = np.array([self.admit(checked.timeout_ms)], dtype=np.int64)
        outputs["preprocess_s"] = np.array([time.perf_counter() - start])
        return outputs


class InProcessRunner(BlsRunner):
    """BLS for most components, ONNX Runtime in this process for the few a loop calls many times:
    the personalizer (one call per generated token; over BLS each call would copy the whole KV cache
    between processes) and, when configured, the UNet (two calls' worth of latents and embeddings
    per denoising step). Each file is this same version's, checked against its manifest."""

    def __init__(
        self, config: Any, version_dir: Path, components: list[str], options: OrtOptions
    ) -> None:
        super().__init__(config)
        files = {}
        for name in components:
            folder = version_dir.parent.parent / name / version_dir.name
            verify_version_files(folder, name)
            files[name] = folder / "model.onnx"
        self.local = OrtRunner.from_files(files, config, options)

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if component in self.local.sessions:
            return self.local.run(component, feeds)
        return super().run(component, feeds)


def _runner(model: _Model, config: Any) -> BlsRunner:
    """BLS, or an InProcessRunner when this model's config.pbtxt turns on running its loop's
    component here (`triton_config.IN_PROCESS`)."""
    name = model.model_config["name"]
    parameters = model.model_config.get("parameters", {})
    if parameters.get(in_process_key(name), {}).get("string_value") != "true":
        return BlsRunner(config)
    options = OrtOptions.from_parameters(parameters)
    return InProcessRunner(config, model.version_dir, [IN_PROCESS[name]], options)


class PersonalizeModel(_Model):
    def setup(self) -> None:
        config, tokenizer = self.pipeline_files()
        runner = _runner(self, config)
        self.pipeline = PigeonPipeline(config, tokenizer, runner)

    def handle(self, request: Any) -> dict[str, np.ndarray]:
        try:
            return self.personalize(request)
        except Exception:  # the request ends here: denoise will not give its slot back
            self.release_slot(request)
            raise

    def personalize(self, request: Any) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        params = self.parameters(request, "personalize")
        mask_rng, token_rng, _ = request_streams(params["seed"])
        # two history_encoder calls, not one: the history's is the same for a returning user and
        # Triton's response cache answers it
        encode = self.pipeline.runner.run
        history = encode("history_encoder", {"images": self.get(request, "history_pixels")[0]})
        reference = encode("history_encoder", {"images": self.get(request, "reference_pixels")})
        item = PersonalizeInput(
            history_ids=history["token_ids"],
            history_keep=history["token_keep"],
            reference_ids=reference["token_ids"][0],
            reference_keep=reference["token_keep"][0],
            text=_text(self.get(request, "text"), "text"),
            reference_mask_ratio=params["reference_mask_ratio"],
        )
        deadline = self.deadline(request, params["timeout_ms"])
        codes = self.pipeline.personalize([item], [mask_rng], [token_rng], deadline)
        ids, keep = codes_to_tokens(codes, self.pipeline.config.history_encoder.num_patches)
        return {
            "token_ids": ids,
            "token_keep": keep,
            "personalize_s": np.array([time.perf_counter() - start]),
        }


class DenoiseModel(_Model):
    def setup(self) -> None:
        config, tokenizer = self.pipeline_files()
        runner = _runner(self, config)
        self.pipeline = PigeonPipeline(config, tokenizer, runner)

    def handle(self, request: Any) -> dict[str, np.ndarray]:
        try:
            return self.denoise(request)
        finally:  # the loops are done with the request, whatever happened
            self.release_slot(request)

    def denoise(self, request: Any) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        params = self.parameters(request, "denoise")
        _, _, latent_rng = request_streams(params["seed"])
        latents = self.pipeline.denoise(
            self.get(request, "prompt_embeds"),
            self.get(request, "pooled_embeds"),
            params["steps"],
            params["guidance"],
            params["sampler"],
            [latent_rng],
            self.get(request, "reference_image_pixels"),
            params["strength"],
            self.deadline(request, params["timeout_ms"]),
        )
        return {"latents": latents, "denoise_s": np.array([time.perf_counter() - start])}


class PostprocessModel(_Model):
    def handle(self, request: Any) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        png = encode_png(to_uint8(self.get(request, "images"))[0])
        timings = {
            name: float(self.get(request, f"{name}_s")[0])
            for name in ("preprocess", "personalize", "denoise")
        }
        timings["postprocess"] = time.perf_counter() - start
        return {
            "image_png": np.array([png], dtype=np.object_),
            "timings": np.array([json.dumps(timings).encode()], dtype=np.object_),
        }


MODEL_CLASSES = {
    "preprocess": "PreprocessModel",
    "personalize": "PersonalizeModel",
    "denoise": "DenoiseModel",
    "postprocess": "PostprocessModel",
}


def model_py(model: str) -> str:
    """The one-line `model.py` placed in each version folder of `model`."""
    cls = MODEL_CLASSES.get(model, "OnnxModel")
    return (
        f'"""Triton Python model `{model}`: see pigeon.serving.triton_backend.{cls}."""\n\n'
        f"from pigeon.serving.triton_backend import {cls} as TritonPythonModel  # noqa: F401\n"
    )
