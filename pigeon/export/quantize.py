"""int8 and mixed-precision artifact folders, made from a validated fp32 export with ONNX Runtime's
quantization and validated like every export.

    pigeon export onnx --checkpoint CKPT --out ART --precision int8 [--calibration demo/data/emojiprefs]
    pigeon export onnx --checkpoint CKPT --out ART --precision mixed

How each component becomes int8 follows from its graph:

    dynamic   no convolution (history_encoder, mask_generator, personalizer, condition_adapter):
              `quantize_dynamic`: int8 weights of the MatMul/Gemm/Gather ops with constant weights,
              activations quantized at run time from their own range; no calibration
    static    convolutions (vae_encoder, unet, vae_decoder): `quantize_static`, QDQ format, per-channel
              int8 weights, uint8 activations whose ranges (MinMax) are calibrated on real component
              inputs: users of the training split (EmojiPrefs, or the procedural shapes when no dataset
              is given) run through the validated fp32 pipeline, every call of the component recorded

Validation is `pigeon.export.validate.validate`, as for every export: the min, opt, max and odd shape
points against PyTorch, typed errors naming component, tensor, point and the measured error, with the
component's `int8` tolerance from `pigeon.specs` (judged against each output's own scale). A statically
quantized component is fed held-out real inputs there (validation-split users through the same
pipeline, fitted to each point's batch): its activation ranges are only defined on the distribution it
was calibrated for, and a calibration that does not match what the pipeline sends is what this check
must catch.

A component whose int8 file fails falls back to fp16, then fp32 (each validated); its manifest entry
records the precision kept, every rejected attempt with its error, and the measured errors of the file
kept. `strict=True` makes a rejection fatal instead (the typed error names the component).

`mixed` builds fp32, fp16 and int8 candidates of every component, validates each, times the valid ones
side by side on this CPU at the opt shape (the serving session options), and keeps the fastest; a
candidate within 10% of the fastest with a smaller file wins. The timings are recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from pigeon.checkpoint import Checkpoint, load_checkpoint
from pigeon.export.errors import ExportError, ToleranceError
from pigeon.export.manifest import MANIFEST, QUANTIZED_PRECISIONS, read_manifest
from pigeon.export.validate import POINTS, validate
from pigeon.files import replace_dir, sha256_file, staging_dir
from pigeon.specs import INT8_IMAGE_MAE, ComponentSpec, Tolerance, component_specs, sample_inputs

log = logging.getLogger(__name__)
FALLBACK = ("fp16", "fp32")  # int8: what a rejected component is kept in, first that validates
MIXED_TIE = 1.10  # mixed: a smaller file within 10% of the fastest candidate's p50 wins
DYNAMIC_OPS = ["MatMul", "Gemm", "Gather"]
STATIC_OPS = ["Conv", "MatMul", "Gemm"]


@dataclass(frozen=True)
class Calibration:
    """Where static quantization's activation ranges come from, and the held-out inputs that check them."""

    data: str = "procedural"  # 'procedural' or an EmojiPrefs folder (its training split)
    users: int = 16  # training-split users run through the fp32 pipeline
    held_out: int = 4  # validation-split users: what statically quantized files are validated on
    batch: int = 4  # users per pipeline call
    steps: int | None = None  # sampler steps per user; None: the checkpoint's
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("users", "held_out", "batch"):
            if getattr(self, name) < 1:
                raise ExportError(f"calibration.{name}={getattr(self, name)} must be >= 1")


def quant_method(proto: onnx.ModelProto) -> str:
    """'static' (calibrated activation ranges) for a convolutional network, more than one Conv node
    (the UNet and the VAE halves), else 'dynamic' (the transformers; the ViT's one patch-embedding
    convolution does not make the history encoder a convolutional network). Counting nodes, not
    weights: the UNet's condition sketch is one large Gemm that outweighs the tiny UNet's convolutions."""
    convolutions = sum(n.op_type == "Conv" for n in proto.graph.node)
    return "static" if convolutions > 1 else "dynamic"


# --------------------------------------------------------------------------------------------------
# Real component inputs


class RecordingRunner:
    """A runner that passes every call through and keeps a copy of the feeds of chosen components."""

    name = "recording"

    def __init__(self, inner, components: list[str]) -> None:
        self.inner = inner
        self.calls: dict[str, list[dict[str, np.ndarray]]] = {c: [] for c in components}

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if component in self.calls:
            self.calls[component].append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.inner.run(component, feeds)


def component_inputs(
    ckpt: Checkpoint,
    runner,
    users: list,
    components: list[str],
    batch: int,
    steps: int | None,
    seed: int,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every call's feeds of `components` while `users` go through the pipeline on `runner`.

    The VAE encoder only runs in image-to-image requests; it gets every image of the users (history,
    reference, ground truth) at the output size instead, the inputs it encodes.
    """
    from pigeon.core.images import to_model_input
    from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline

    recorder = RecordingRunner(runner, components)
    pipe = PigeonPipeline(ckpt.config, ckpt.tokenizer, recorder)
    for start in range(0, len(users), batch):
        chunk = users[start : start + batch]
        pipe(
            [
                GenerationRequest(
                    history=list(u.history),
                    reference=u.reference,
                    text=u.text,
                    seed=seed + start + j,
                    steps=steps,
                )
                for j, u in enumerate(chunk)
            ]
        )
    calls = recorder.calls
    if "vae_encoder" in components:
        size = ckpt.config.image_size
        images = [
            to_model_input(img, size) for u in users for img in (*u.history, u.reference, u.target)
        ]
        calls["vae_encoder"] = [
            {"images": np.stack(images[i : i + 2 * batch])}
            for i in range(0, len(images), 2 * batch)
        ]
    return calls


class HeldOutInputs:
    """Real inputs of one component as rows, fitted to a shape point's batch (rows drawn by seed)."""

    def __init__(self, spec: ComponentSpec, calls: list[dict[str, np.ndarray]]) -> None:
        if not calls:
            raise ExportError(f"{spec.name}: no held-out inputs were recorded")
        self.spec = spec
        self.rows = {n: np.concatenate([c[n] for c in calls]) for n in spec.input_names}

    def __call__(self, point, seed: int = 0) -> dict[str, np.ndarray]:
        values = self.spec.point(point)
        n = len(next(iter(self.rows.values())))
        rng = np.random.default_rng(seed + values["batch"])
        idx = rng.choice(n, values["batch"], replace=values["batch"] > n)
        return {k: np.ascontiguousarray(v[idx]) for k, v in self.rows.items()}


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over recorded feeds."""

    def __init__(self, items: list[dict[str, np.ndarray]]) -> None:
        self.items = iter(items)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)

    def rewind(self) -> None:  # pragma: no cover - only used by calibrators that read twice
        raise ExportError("calibration data is read once")


# --------------------------------------------------------------------------------------------------
# Quantization


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs advice and per-tensor notes on the root logger at WARNING."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_file(
    src: Path, dst: Path, method: str, calibration: list[dict[str, np.ndarray]] | None = None
) -> dict:
    """Write the int8 version of `src` to `dst`; returns how it was made (for the manifest)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    dst.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_root_logger():
        if method == "dynamic":
            quantize_dynamic(
                str(src),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=False,
                op_types_to_quantize=DYNAMIC_OPS,
                extra_options={"MatMulConstBOnly": True},
            )
            return {
                "method": "dynamic",
                "ops": DYNAMIC_OPS,
                "weights": "int8 per tensor",
                "activations": "uint8, range computed at run time",
            }
        if not calibration:
            raise ExportError(f"{src}: static quantization needs calibration inputs")
        quantize_static(
            str(src),
            str(dst),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=STATIC_OPS,
            # no CalibMaxIntermediateOutputs: MinMax keeps only each tensor's min/max per call, and
            # in onnxruntime 1.32 that option drops the calls collected so far instead of merging
            # their ranges (only the last few calls would calibrate)
        )
    return {
        "method": "static",
        "format": "QDQ",
        "ops": STATIC_OPS,
        "weights": "int8 per channel",
        "activations": "uint8, MinMax ranges",
        "calibration_calls": len(calibration),
    }


# --------------------------------------------------------------------------------------------------
# Candidates, validation, choice


def _tolerance_json(t: Tolerance) -> dict:
    return {k: v for k, v in asdict(t).items() if v not in (0, 0.0, None) or k in ("atol", "rtol")}


class _Attempts:
    """The candidate files of one component: each validated, the valid ones kept, the rest recorded."""

    def __init__(self, spec: ComponentSpec, ckpt: Checkpoint, reference, inputs, strict: bool):
        self.spec, self.ckpt, self.reference, self.inputs, self.strict = (
            spec,
            ckpt,
            reference,
            inputs,
            strict,
        )
        self.valid: dict[str, Path] = {}
        self.results: dict[str, dict] = {}
        self.rejected: list[dict] = []

    def attempt(self, precision: str, path: Path, how: dict | None = None) -> bool:
        """`validate` of one file with the component's `precision` tolerance."""
        from pigeon.inference.runners import OrtRunner

        spec = self.spec
        if precision not in spec.tolerance:
            raise ExportError(f"{spec.name}: no {precision} tolerance declared in pigeon.specs")
        relative: dict = {}
        try:
            # a candidate ONNX Runtime cannot load (e.g. an fp16 conversion that leaves a contrib
            # op's inputs in two types) is rejected like one that loads and misses its tolerance
            try:
                runner = OrtRunner.from_files({spec.name: path}, self.ckpt.config)
            except Exception as exc:  # onnxruntime's load errors (Fail, InvalidGraph, ...)
                raise ExportError(f"ONNX Runtime cannot load the {precision} file: {exc}") from exc
            errors = validate(
                spec,
                self.ckpt.config,
                precision,
                lambda f: self.reference.run(spec.name, f),
                lambda f: runner.run(spec.name, f),
                inputs=self.inputs,
                relative=relative,
            )
        except ExportError as exc:
            if self.strict:
                raise
            self.rejected.append({"precision": precision, "error": f"{type(exc).__name__}: {exc}"})
            log.warning("%s: %s rejected (%s)", spec.name, precision, exc)
            return False
        self.valid[precision] = path
        self.results[precision] = {"max_error": errors, "relative_error": relative, "how": how}
        return True

    def timings(self, runs: int = 15, warmup: int = 3) -> dict[str, dict[str, float]]:
        """p50/p95 ms of every valid candidate at the opt shape, side by side (round robin)."""
        from pigeon.inference.runners import OrtOptions, OrtRunner

        spec, config = self.spec, self.ckpt.config
        feeds = self.inputs("opt") if self.inputs else sample_inputs(spec, config, "opt")
        options = OrtOptions(intra_op_threads=2, inter_op_threads=1)
        runners = {
            p: OrtRunner.from_files({spec.name: f}, config, options) for p, f in self.valid.items()
        }
        times: dict[str, list[float]] = {p: [] for p in runners}
        for i in range(warmup + runs):
            for p, r in runners.items():
                start = time.perf_counter()
                r.run(spec.name, feeds)
                if i >= warmup:
                    times[p].append((time.perf_counter() - start) * 1e3)
        return {
            p: {"p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95))}
            for p, t in times.items()
        }


def _choose(tried: _Attempts, precision: str, timings: dict | None, exclude=()) -> str:
    """int8: the first valid of int8, fp16, fp32; mixed: the fastest valid (a smaller file within
    MIXED_TIE of it wins). `exclude`: precisions the pipeline check rejected."""
    valid = [p for p in tried.valid if p not in exclude]
    if precision == "mixed":
        fastest = min(timings[p]["p50_ms"] for p in valid)
        close = [p for p in valid if timings[p]["p50_ms"] <= fastest * MIXED_TIE]
        return min(close, key=lambda p: tried.valid[p].stat().st_size)
    return next(p for p in ("int8", *FALLBACK) if p in valid)


def pipeline_images(ckpt: Checkpoint, files: dict[str, Path], users: list, steps) -> np.ndarray:
    """uint8 images of `users` (seed = index) through the pipeline over `files` on ONNX Runtime."""
    from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
    from pigeon.inference.runners import OrtRunner

    pipe = PigeonPipeline(ckpt.config, ckpt.tokenizer, OrtRunner.from_files(files, ckpt.config))
    requests = [
        GenerationRequest(
            history=list(u.history), reference=u.reference, text=u.text, seed=i, steps=steps
        )
        for i, u in enumerate(users)
    ]
    return np.stack([pipe(r)[0].image for r in requests])


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def pipeline_check(
    ckpt: Checkpoint,
    fp32_files: dict[str, Path],
    chosen_files: dict[str, Path],
    fallback_files: dict[str, Path],
    users: list,
    steps,
    limit: float,
) -> dict:
    """What users see: held-out users' images from the variant against the fp32 files.

    `chosen_files`: the variant (every component); `fallback_files`: for each int8 component, the
    file it keeps if its int8 file is rejected. Each int8 component is first swapped alone into the
    fp32 pipeline; one whose images differ by more than `limit` (mean |pixel difference|, 0-255) is
    rejected. Then the whole variant; while that exceeds `limit`, the int8 component with the largest
    error alone is rejected. Returns the measurements and the rejected components; `variant` is the
    measurement of the variant as finally kept.
    """
    int8 = list(fallback_files)
    want = pipeline_images(ckpt, fp32_files, users, steps)
    alone = {
        n: _mae(pipeline_images(ckpt, {**fp32_files, n: chosen_files[n]}, users, steps), want)
        for n in int8
    }
    rejected = [n for n in int8 if alone[n] > limit]
    while True:
        files = {**chosen_files, **{n: fallback_files[n] for n in rejected}}
        variant = _mae(pipeline_images(ckpt, files, users, steps), want)
        kept = [n for n in int8 if n not in rejected]
        if variant <= limit or not kept:
            break
        rejected.append(max(kept, key=lambda n: alone[n]))
    return {
        "users": len(users),
        "limit_mean_abs_pixel": limit,
        "alone_mean_abs_pixel": {n: round(v, 4) for n, v in alone.items()},
        "variant_mean_abs_pixel": round(variant, 4),
        "rejected": rejected,
    }


def export_quantized(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    *,
    precision: str = "int8",
    calibration: Calibration = Calibration(),
    strict: bool = False,
    fused_attention: bool = False,
    components: list[str] | None = None,
    overwrite: bool = False,
    model_hook=None,
    calibration_hook: Callable[[str, list[dict[str, np.ndarray]]], list] | None = None,
    manifest_extra: dict | None = None,
) -> dict:
    """Export fp32, derive the `precision` ('int8' or 'mixed') artifact folder, validate, write it
    atomically; returns the manifest (with `manifest_extra`'s fields).

    calibration_hook(component, calls) -> calls runs on the recorded calibration inputs before static
    quantization (tests use it to calibrate a component wrongly on purpose: validation must then
    reject it).
    """
    from pigeon.export.onnx_export import export_float, save_onnx, to_fp16
    from pigeon.inference.runners import OrtRunner, TorchRunner
    from pigeon.training.data import load_data

    if precision not in QUANTIZED_PRECISIONS:
        raise ExportError(f"precision={precision!r} is not one of {list(QUANTIZED_PRECISIONS)}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists (pass --overwrite to replace it)")
    specs = component_specs(ckpt.config)
    staging = staging_dir(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work.", dir=out.parent))
    try:
        base = work / "fp32"
        fp32_manifest = export_float(
            ckpt,
            base,
            precision="fp32",
            fused_attention=fused_attention,
            components=components,
            model_hook=model_hook,
        )
        names = list(fp32_manifest["components"])
        fp32_files = {n: base / n / "model.onnx" for n in names}
        protos = {n: onnx.load(str(fp32_files[n])) for n in names}
        methods = {n: quant_method(p) for n, p in protos.items()}
        static = [n for n in names if methods[n] == "static"]
        whole = set(names) == set(specs)  # the pipeline check needs every component

        # real inputs: training users to calibrate, validation users held out to validate
        held_out: dict[str, HeldOutInputs] = {}
        recorded: dict[str, list] = {}
        val_users: list = []
        data_info = None
        if static or whole:
            start = time.perf_counter()
            data = load_data(calibration.data, ckpt.config.image_size)
            length = min(5, ckpt.config.personalizer.max_history)
            train_users = data.users(
                np.random.default_rng(calibration.seed), calibration.users, length, 0.2
            )
            val_users = data.validation_users(calibration.held_out, length)
            fp32_runner = (
                OrtRunner.from_files(fp32_files, ckpt.config) if whole else TorchRunner(ckpt.model)
            )
            args = (static, calibration.batch, calibration.steps)
            recorded = component_inputs(ckpt, fp32_runner, train_users, *args, calibration.seed)
            checks = component_inputs(ckpt, fp32_runner, val_users, *args, calibration.seed + 1)
            held_out = {n: HeldOutInputs(specs[n], checks[n]) for n in static}
            data_info = {
                "data": calibration.data
                if calibration.data == "procedural"
                else str(Path(calibration.data).resolve()),
                "source": data.name,
                "calibration_users": f"{calibration.users} users of the training split",
                "validation_users": f"{calibration.held_out} users of the validation split",
                "steps": calibration.steps or ckpt.config.scheduler.num_inference_steps,
                "seed": calibration.seed,
                "calls": {n: len(recorded[n]) for n in static},
                "seconds": round(time.perf_counter() - start, 1),
            }
            log.info("recorded real inputs of %s in %.1fs", static, data_info["seconds"])

        reference = TorchRunner(ckpt.model)  # model_hook, if any, was applied by export_onnx
        tries: dict[str, _Attempts] = {}
        timings: dict[str, dict | None] = {}
        chosen: dict[str, str] = {}
        for name in names:
            tried = tries[name] = _Attempts(
                specs[name], ckpt, reference, held_out.get(name), strict
            )
            calls = recorded.get(name)
            if calls is not None and calibration_hook is not None:
                calls = calibration_hook(name, calls)
            int8_path = work / "int8" / name / "model.onnx"
            how = quantize_file(fp32_files[name], int8_path, methods[name], calls)
            tried.attempt("int8", int8_path, how)
            # fp16 and fp32 are candidates for mixed, and the fallbacks of int8 (also when the
            # pipeline check below rejects an int8 file)
            fp16_path = work / "fp16" / name / "model.onnx"
            save_onnx(to_fp16(protos[name]), fp16_path)
            tried.attempt("fp16", fp16_path)
            tried.valid["fp32"] = fp32_files[name]
            tried.results["fp32"] = {"max_error": fp32_manifest["components"][name]["max_error"]}
            timings[name] = tried.timings() if precision == "mixed" else None
            chosen[name] = _choose(tried, precision, timings[name])

        check = None
        int8 = [n for n in names if chosen[n] == "int8"]
        if whole and int8:
            check = pipeline_check(
                ckpt,
                fp32_files,
                {n: tries[n].valid[chosen[n]] for n in names},
                {
                    n: tries[n].valid[_choose(tries[n], precision, timings[n], exclude=("int8",))]
                    for n in int8
                },
                val_users,
                calibration.steps,
                INT8_IMAGE_MAE,
            )
            for name in check["rejected"]:
                error = (
                    f"PipelineCheck: {name} int8 alone in the fp32 pipeline changes held-out users' "
                    f"images by {check['alone_mean_abs_pixel'][name]:.3g} mean |pixel difference| "
                    f"(limit {INT8_IMAGE_MAE:g} for the variant)"
                )
                if strict:
                    raise ToleranceError(error)
                tries[name].rejected.append({"precision": "int8", "error": error})
                chosen[name] = _choose(tries[name], precision, timings[name], exclude=("int8",))
                log.warning("%s: int8 rejected by the pipeline check", name)

        entries = {}
        for name in names:
            entries[name] = _entry(
                name,
                tries[name],
                chosen[name],
                fp32_manifest["components"][name],
                staging,
                fp32_files[name],
                timings[name],
                name in held_out,
            )
        manifest = {
            **{k: v for k, v in fp32_manifest.items() if k != "components"},
            "precision": precision,
            "quantization": {
                "tool": "onnxruntime.quantization",
                "fallback": list(FALLBACK) if precision == "int8" else None,
                "strict": strict,
                "calibration": data_info,
                "pipeline_check": check,
            },
            **(manifest_extra or {}),
            "components": entries,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        read_manifest(staging)  # every file as listed
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _entry(
    name: str,
    tried: _Attempts,
    chosen: str,
    fp32_entry: dict,
    staging: Path,
    fp32_file: Path,
    timings: dict | None,
    on_real_inputs: bool,
) -> dict:
    """Copy the chosen file into the artifact folder; its manifest entry."""
    target = staging / name / "model.onnx"
    target.parent.mkdir(parents=True)
    shutil.copyfile(tried.valid[chosen], target)
    result = tried.results[chosen]
    entry = {
        "file": f"{name}/model.onnx",
        "opset": fp32_entry["opset"],
        "precision": chosen,
        "max_error": result["max_error"],
        "tolerance": _tolerance_json(tried.spec.tolerance[chosen]),
    }
    if result.get("relative_error"):
        entry["relative_error"] = result["relative_error"]
    if chosen == "int8":
        entry["quantization"] = result["how"]
        if on_real_inputs:
            entry["validated_on"] = "held-out real inputs (validation-split users)"
    entry["rejected"] = tried.rejected
    if timings is not None:
        entry["candidates_ms"] = {
            p: {k: round(v, 3) for k, v in t.items()} for p, t in timings.items()
        }
    entry["bytes"] = target.stat().st_size
    entry["fp32_bytes"] = fp32_file.stat().st_size
    entry["files"] = {p.name: sha256_file(p) for p in sorted(target.parent.iterdir())}
    log.info(
        "%s: kept %s (%.1f MB of fp32's %.1f MB)%s",
        name,
        chosen,
        entry["bytes"] / 1e6,
        entry["fp32_bytes"] / 1e6,
        f"; rejected {[r['precision'] for r in tried.rejected]}" if tried.rejected else "",
    )
    return entry


__all__ = [
    "Calibration",
    "HeldOutInputs",
    "POINTS",
    "RecordingRunner",
    "component_inputs",
    "export_quantized",
    "quant_method",
    "quantize_file",
]
