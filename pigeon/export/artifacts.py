"""The ONNX artifact folder of a checkpoint at any precision: the one entry point for the CLI,
`pigeon export all`, the benchmarks and the tests.

    fp32, fp16     pigeon.export.onnx_export.export_float
    int8, mixed    pigeon.export.quantize.export_quantized (from a validated fp32 export)
    --variant      pigeon.export.variants: a named precision and its served sampling defaults

Both validate every file against PyTorch before anything is written in place; the folder's layout
is `pigeon.export.onnx_export`'s.
"""

from __future__ import annotations

from pathlib import Path

from pigeon.checkpoint import Checkpoint
from pigeon.export.errors import ExportError
from pigeon.export.manifest import PRECISIONS, QUANTIZED_PRECISIONS
from pigeon.export.onnx_export import export_float
from pigeon.export.quantize import Calibration, export_quantized
from pigeon.export.variants import VARIANTS, resolve


def export_onnx(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    *,
    precision: str | None = None,
    variant: str = "default",
    fused_attention: bool = False,
    components: list[str] | None = None,
    overwrite: bool = False,
    model_hook=None,
    calibration: Calibration | None = None,
    strict: bool = False,
) -> dict:
    """Export, validate and write an artifact folder atomically; returns the manifest.

    model_hook(model) runs after tracing and before validation (tests use it to break an export on
    purpose). `calibration` (int8, mixed): the data the static quantization records. `strict`: a
    component that fails its fp16 or int8 validation is an error instead of kept in higher
    precision. `variant` (pigeon.export.variants): a named precision with the sampling defaults the
    files are served with, recorded in the manifest; `precision` None means the variant's, or fp32.
    """
    precision, sampling_defaults = resolve(variant, precision)
    fused_attention = fused_attention or VARIANTS[variant].fused_attention
    if precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    common = {
        "fused_attention": fused_attention,
        "components": components,
        "overwrite": overwrite,
        "model_hook": model_hook,
        "strict": strict,
        "manifest_extra": {"variant": variant, "sampling_defaults": sampling_defaults},
    }
    if precision in QUANTIZED_PRECISIONS:
        return export_quantized(
            checkpoint, out, precision=precision, calibration=calibration or Calibration(), **common
        )
    if calibration is not None:
        raise ExportError(f"calibration applies to int8 and mixed, not precision={precision!r}")
    return export_float(checkpoint, out, precision=precision, **common)
