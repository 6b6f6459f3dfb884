"""Retrain -> re-export: publish a validated artifact set as model version N of a Triton repository.

    pigeon export all --checkpoint runs/x --repository triton_models --version 3

Exports and validates into a staging folder inside the repository (same filesystem), then renames each
component's folder to `<repository>/<component>/<N>/`. Version numbers are never reused. If validation
fails nothing is published; if a rename fails half way, the versions already moved are moved back, so
the serving versions are never touched and no half-published version remains.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pigeon.export.errors import ExportError
from pigeon.export.manifest import MANIFEST, read_manifest
from pigeon.files import staging_dir

log = logging.getLogger(__name__)


def publish(artifacts: Path, repository: Path, version: int) -> list[Path]:
    """Move a validated artifact folder's components into place as `version`; returns the folders."""
    manifest = read_manifest(artifacts)
    targets = {name: repository / name / str(version) for name in manifest["components"]}
    taken = [str(t) for t in targets.values() if t.exists()]
    if taken:
        raise ExportError(
            f"version {version} already exists ({taken[0]}); versions are never reused"
        )
    moved: list[Path] = []
    try:
        for name, target in targets.items():
            source = artifacts / name
            shutil.copyfile(
                artifacts / MANIFEST, source / MANIFEST
            )  # each version describes itself
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            moved.append(target)
    except BaseException:
        for name, target in zip(targets, moved, strict=False):  # roll back, newest state first
            target.rename(artifacts / name)
        raise
    return moved


def export_all(
    checkpoint: str | Path,
    repository: str | Path,
    version: int,
    *,
    precision: str = "fp32",
    fused_attention: bool = False,
    components: list[str] | None = None,
    model_hook=None,
) -> dict:
    """Export + validate + publish; returns the manifest."""
    from pigeon.export.onnx_export import export_onnx

    repository = Path(repository)
    if version < 1:
        raise ExportError(f"version={version} must be >= 1 (Triton version folders are positive)")
    staging = staging_dir(repository / f"v{version}")
    try:
        target = staging / "artifacts"
        manifest = export_onnx(
            checkpoint,
            target,
            precision=precision,
            fused_attention=fused_attention,
            components=components,
            model_hook=model_hook,
        )
        moved = publish(target, repository, version)
        log.info("published version %d: %s", version, ", ".join(str(m) for m in moved))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
