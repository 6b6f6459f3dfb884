"""Client for a served Pigeon (`pigeon` ensemble), over gRPC or HTTP, and version deployment.

    client = PigeonClient("127.0.0.1:8001", protocol="grpc", timeout_s=60)
    result = client.generate(history=[b"...png", ...], reference=b"...", text="a cat", seed=0)
    # the server stops the request once 60 s have passed (timeout_ms, sent by default)
    result.image_png, result.timings, result.latency_s

    deploy(url, repository / "cpu", version=3)     # every model to version 3, no restart
    rollback(url, repository / "cpu")               # back to the version deployed before

A deployment loads each model's new version through Triton's model-control API, networks first; Triton
swaps a model's version only once the new one is ready, so requests in flight finish on the old one and
none is lost. The ensemble is not reloaded: its steps name no version (-1, the loaded one), and loading
an ensemble makes Triton reload its steps from their on-disk configs, which would undo the switch.
While the models switch one after another (seconds), a request can meet steps of both versions; a
strictly atomic cut-over needs a second ensemble (blue/green). Deployed versions are recorded in
`<repository>/.deployments.json`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

import numpy as np

from pigeon.core.deadline import MAX_TIMEOUT_MS
from pigeon.files import write_atomic
from pigeon.interface import PARAMETERS
from pigeon.serving.triton_config import PYTHON_MODELS

CLIENT_DTYPES = {"int64": "INT64", "float32": "FP32", "bytes": "BYTES"}

DEPLOYMENTS = ".deployments.json"


# gRPC status names <-> HTTP status codes, as Triton maps its error codes (docs/RELIABILITY.md)
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
}
STATUS_OF_HTTP = {code: name for name, code in HTTP_STATUS.items()}


class ClientError(RuntimeError):
    """The server answered with an error, or did not answer in time; the message says which.

    `status` is the gRPC status name whatever the protocol ("INVALID_ARGUMENT": the request is bad,
    do not retry; "UNAVAILABLE" / "DEADLINE_EXCEEDED": retry later; "INTERNAL": the server's fault),
    `http_status` its HTTP code; both None for an error raised before anything was sent."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.http_status = HTTP_STATUS.get(status) if status else None


def status_of(exc) -> str | None:
    """A tritonclient InferenceServerException's status as a gRPC status name: gRPC gives
    "StatusCode.INVALID_ARGUMENT", HTTP the response's code ("400")."""
    raw = str(exc.status() or "")
    if raw.startswith("StatusCode."):
        return raw.removeprefix("StatusCode.")
    if raw.isdigit():
        return STATUS_OF_HTTP.get(int(raw), "INTERNAL" if int(raw) >= 500 else "INVALID_ARGUMENT")
    return None


@dataclass
class ServedResult:
    image_png: bytes
    timings: dict[str, float] = field(default_factory=dict)
    latency_s: float = 0.0


def _read(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


class PigeonClient:
    """Every call has a deadline (`timeout_s`): a server that is down, stopped or hung is a
    `ClientError` naming the address, never a hang."""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 120.0) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol={protocol!r} must be 'grpc' or 'http'")
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or not math.isfinite(timeout_s)
            or timeout_s <= 0
        ):
            raise ValueError(f"timeout_s={timeout_s!r} must be a finite number of seconds > 0")
        self.url = url
        self.protocol = protocol
        self.timeout_s = timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self.tc = tc
        kwargs = (
            {}
            if protocol == "grpc"
            else {"connection_timeout": timeout_s, "network_timeout": timeout_s}
        )
        self.client = tc.InferenceServerClient(url, **kwargs)

    def _input(self, name: str, value: np.ndarray, dtype: str):
        tensor = self.tc.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        return tensor

    def generate(
        self,
        history: list[bytes | str | Path],
        reference: bytes | str | Path,
        text: str,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        reference_mask_ratio: float | None = None,
        sampler: str | None = None,
        strength: float | None = None,
        timeout_ms: int | None = None,
        style_start: str | None = None,
    ) -> ServedResult:
        """One request to the `pigeon` ensemble; the parameters are `pigeon.interface.PARAMETERS`
        (None: the server's default). `timeout_ms` None sends the client's own `timeout_s`, as
        gRPC propagates a deadline: the server stops a request that nobody waits for any more."""
        from tritonclient.utils import InferenceServerException

        if timeout_ms is None:
            timeout_ms = min(math.ceil(self.timeout_s * 1000), MAX_TIMEOUT_MS)

        try:
            encoded = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ClientError(
                f"text is not valid UTF-8 ({exc.reason} at character {exc.start})"
            ) from None
        inputs = [
            self._input(
                "history_images", np.array([_read(h) for h in history], np.object_), "BYTES"
            ),
            self._input("reference_image", np.array([_read(reference)], np.object_), "BYTES"),
            self._input("text", np.array([encoded], np.object_), "BYTES"),
        ]
        given = locals()
        for p in PARAMETERS:
            value = given[p.name]
            if value is not None:
                dtype = CLIENT_DTYPES[p.dtype]
                try:
                    array = p.to_array(value)
                except (OverflowError, ValueError, TypeError):
                    raise ClientError(f"{p.name}={value!r} cannot be sent as {dtype}") from None
                inputs.append(self._input(p.name, array, dtype))
        outputs = [
            self.tc.InferRequestedOutput("image_png"),
            self.tc.InferRequestedOutput("timings"),
        ]
        start = time.perf_counter()
        try:
            if self.protocol == "grpc":
                response = self.client.infer(
                    "pigeon", inputs, outputs=outputs, client_timeout=self.timeout_s
                )
            else:
                response = self.client.infer("pigeon", inputs, outputs=outputs)
        except InferenceServerException as exc:
            raise ClientError(exc.message(), status_of(exc)) from None
        except (OSError, HTTPException) as exc:  # HTTP: refused, reset, timed out
            if isinstance(exc, TimeoutError):
                raise ClientError(
                    f"{self.url}: no answer within {self.timeout_s:g}s", "DEADLINE_EXCEEDED"
                ) from None
            raise ClientError(
                f"{self.url}: {exc.__class__.__name__}: {exc} (after "
                f"{time.perf_counter() - start:.1f}s)",
                "UNAVAILABLE",
            ) from None
        latency = time.perf_counter() - start
        return ServedResult(
            bytes(response.as_numpy("image_png")[0]),
            json.loads(response.as_numpy("timings")[0]),
            latency,
        )

    def statistics(self, model: str = "") -> dict:
        stats = self.client.get_inference_statistics(
            model_name=model, **({"as_json": True} if self.protocol == "grpc" else {})
        )
        return stats

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> PigeonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- versions ---------------------------------------------------------------------------------


def _load_order(repository: Path) -> list[str]:
    """Networks first, then the Python models that call them; never the ensemble (see above)."""
    models = sorted(
        p.name
        for p in repository.iterdir()
        if (p / "config.pbtxt").exists() and not p.name.startswith(".")
    )
    networks = [m for m in models if m not in PYTHON_MODELS and m != "pigeon"]
    return networks + [m for m in PYTHON_MODELS if m in models]


def _config_with_version(repository: Path, model: str, version: int) -> str:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(
        (repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    config.version_policy.specific.versions[:] = [version]
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def history(repository: Path) -> list[int]:
    path = repository / DEPLOYMENTS
    return json.loads(path.read_text())["versions"] if path.exists() else []


def loaded_versions(client, headers: dict[str, str] | None = None) -> dict[str, int]:
    """{model: version} of every model the server has READY (an HTTP `InferenceServerClient`)."""
    return {
        m["name"]: int(m["version"])
        for m in client.get_model_repository_index(headers=headers)
        if m.get("state") == "READY" and m.get("version")
    }


def deploy(
    url: str, repository: str | Path, version: int, headers: dict[str, str] | None = None
) -> list[str]:
    """Switch every model of `repository` (one target's folder) to `version`, without a restart.

    `headers`: e.g. {"admin-key": "..."} when the server restricts its model-repository API. If a
    model of the new version fails to load (a corrupt file), the models already switched are put
    back on the version they served before, so the server never serves a mix of versions; the
    error names the model."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    repository = Path(repository)
    models = _load_order(repository)
    missing = [m for m in [*models, "pigeon"] if not (repository / m / str(version)).is_dir()]
    if missing == ["pigeon"]:
        raise ClientError(
            f"version {version} in {repository} is incomplete (no pigeon/{version}, which a "
            "publish writes last): an interrupted publish; remove its folders and publish again"
        )
    if missing:
        raise ClientError(f"version {version} is not published for {missing[0]} in {repository}")
    client = http.InferenceServerClient(url, network_timeout=300.0)
    switched: list[str] = []
    try:
        before = loaded_versions(client, headers)
        for model in models:
            client.load_model(
                model, config=_config_with_version(repository, model, version), headers=headers
            )
            switched.append(model)
    except InferenceServerException as exc:
        restored = []
        for model in reversed(switched):
            if model in before and before[model] != version:
                try:
                    client.load_model(
                        model,
                        config=_config_with_version(repository, model, before[model]),
                        headers=headers,
                    )
                    restored.append(f"{model}={before[model]}")
                except InferenceServerException:
                    pass
        raise ClientError(
            f"deploying version {version}: {exc.message()}"
            + (f"; put back {', '.join(restored)}" if restored else "")
        ) from None
    except OSError as exc:
        raise ClientError(f"deploying version {version} to {url}: {exc}") from None
    finally:
        client.close()
    record = history(repository) + [version]
    write_atomic(repository / DEPLOYMENTS, json.dumps({"versions": record}) + "\n")
    return models


def rollback(url: str, repository: str | Path, headers: dict[str, str] | None = None) -> int:
    """Redeploy the version that was serving before the current one; returns it."""
    repository = Path(repository)
    deployed = history(repository)
    if len(deployed) < 2:
        raise ClientError(f"no earlier deployment recorded in {repository / DEPLOYMENTS}")
    previous = deployed[-2]
    deploy(url, repository, previous, headers)
    write_atomic(repository / DEPLOYMENTS, json.dumps({"versions": deployed[:-1]}) + "\n")
    return previous
