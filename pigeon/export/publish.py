"""Retrain -> re-export: export, validate and publish a checkpoint as model version N.

    pigeon export all --checkpoint runs/x --repository triton_models --version 3 [--target cpu]

Exports and validates into a staging folder in the repository folder, beside (never inside) the
target's Triton model repository: tritonserver treats every folder of its model repository as a model
and refuses to start on one without a config. Then publishes every model's version folder atomically
(`pigeon.serving.repository.publish_version`). A failed validation or a full disk publishes nothing;
the serving versions are never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pigeon.config import ServingConfig
from pigeon.export.errors import ExportError
from pigeon.files import staging_dir


def export_all(
    checkpoint: str | Path,
    repository: str | Path,
    version: int,
    *,
    target: str = "cpu",
    serving: ServingConfig | None = None,
    precision: str = "fp32",
    fused_attention: bool = False,
    components: list[str] | None = None,
    model_hook=None,
    calibration=None,
    strict: bool = False,
) -> dict:
    """Export + validate + publish into `repository/target`; returns the manifest.

    int8 and mixed (pigeon.export.quantize) are CPU variants: ONNX Runtime runs them on the `cpu`
    target; the `gpu` target builds TensorRT engines from fp32/fp16 files."""
    from pigeon.checkpoint import load_checkpoint
    from pigeon.export.onnx_export import export_onnx
    from pigeon.serving.repository import publish_version, write_configs

    if version < 1:
        raise ExportError(f"version={version} must be >= 1 (Triton version folders are positive)")
    if target == "gpu" and precision in ("int8", "mixed"):
        raise ExportError(
            f"precision={precision!r} is a cpu-target variant (ONNX Runtime quantization); "
            "publish fp32 or fp16 for the gpu target"
        )
    root = Path(repository) / target
    ckpt = load_checkpoint(checkpoint)
    staging = staging_dir(Path(repository) / f"{target}-v{version}")  # not inside root (see above)
    try:
        artifacts = staging / "artifacts"
        manifest = export_onnx(
            ckpt,
            artifacts,
            precision=precision,
            fused_attention=fused_attention,
            components=components,
            model_hook=model_hook,
            calibration=calibration,
            strict=strict,
        )
        write_configs(root, ckpt.config, serving or ServingConfig(), target)
        publish_version(root, ckpt.path, artifacts, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
