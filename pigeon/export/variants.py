"""Named export variants: a precision and the sampling defaults the files are served with.

    pigeon export onnx --checkpoint CKPT --out DIR --variant fast
    pigeon export all --checkpoint CKPT --repository triton_models --version N --variant fast

    variant   ONNX files                               served sampling defaults
    default   --precision (fp32 unless given)          the checkpoint's scheduler
    fast      mixed: per component the fastest of      DDIM, 10 steps
              int8 / fp16 / fp32 that validates, timed
              on the exporting CPU; fused attention (opset 23
              ONNX Attention, RMSNormalization and
              RotaryEmbedding)

The sampling defaults travel in the artifact manifest (`sampling_defaults`), so every reader of the
folder applies the same ones: `pigeon generate --backend onnxruntime --artifacts DIR` and each
Python model of a published version. A request's own `steps` or `sampler` still wins. `fast`'s
settings were chosen on 64 validation users, where they keep StyleAcc, ConceptR@5 and SSIM inside the
fp32 default's intervals; DPM-Solver++(2M) on the int8 files, at 10 to 20 steps, took SSIM below that
interval and DDIM did not (benchmarks/README.md, "The fast variant"). Torch-free: the CLI and the
Triton Python backend import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pigeon.export.errors import ExportError


@dataclass(frozen=True)
class Variant:
    precision: str | None  # None: the caller's --precision
    sampling_defaults: dict[str, Any]  # SchedulerConfig fields served as the request defaults
    # opset 23's fused operators; on by the variant, or by --fused-attention for any variant
    fused_attention: bool = False


VARIANTS = {
    "default": Variant(precision=None, sampling_defaults={}),
    # mixed, not int8: where a component's int8 file fails validation (on an AVX2 CPU the UNet's
    # moves images past the pipeline check) the fastest valid file is kept, not the smallest (fp16
    # runs slower than fp32 on a CPU without fp16 arithmetic). Fused attention shortens each of the
    # personalizer's decode steps (benchmarks/README.md, "The fast variant")
    "fast": Variant(
        precision="mixed",
        sampling_defaults={"sampler": "ddim", "num_inference_steps": 10},
        fused_attention=True,
    ),
}


def resolve(variant: str, precision: str | None) -> tuple[str, dict[str, Any]]:
    """(precision, sampling defaults) of `variant`; `precision` is the one asked for explicitly
    (None: not given), refused where the variant fixes another."""
    if variant not in VARIANTS:
        raise ExportError(f"variant={variant!r} is not one of {list(VARIANTS)}")
    chosen = VARIANTS[variant]
    if chosen.precision is None:
        return precision or "fp32", dict(chosen.sampling_defaults)
    if precision not in (None, chosen.precision):
        raise ExportError(
            f"variant={variant!r} exports {chosen.precision} files; precision={precision!r} "
            "contradicts it (leave --precision out, or use --variant default)"
        )
    return chosen.precision, dict(chosen.sampling_defaults)


def with_sampling_defaults(config, manifest: dict):
    """`config` (a PipelineConfig) with the scheduler defaults an artifact manifest carries."""
    defaults = manifest.get("sampling_defaults") or {}
    if not defaults:
        return config
    fields = {f.name for f in dataclasses.fields(config.scheduler)}
    unknown = sorted(set(defaults) - fields)
    if unknown:
        raise ExportError(
            f"manifest sampling_defaults {unknown} are not scheduler fields ({sorted(fields)})"
        )
    return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, **defaults))
