"""The Triton model repository on disk: generated configs and atomically published versions.

    triton_models/<target>/<model>/config.pbtxt       generated (committed for the tiny preset)
    triton_models/<target>/<model>/<N>/model.py       one line, imports pigeon.serving.triton_backend
    triton_models/<target>/<network>/<N>/model.onnx   + manifest.json (hash-checked at load)
    triton_models/<target>/<python model>/<N>/pipeline/   the checkpoint's configs and tokenizer
    triton_models/<target>/pigeon/<N>/                the ensemble (empty version folder)

A version is written into staging folders beside its final places (`<model>/.<N>.<id>.tmp`, which
Triton ignores) and then renamed into place, model by model, the ensemble `pigeon` last: `pigeon/<N>`
existing is the mark of a complete version. If a write fails (a full disk) or a rename fails, the
staging folders are removed and the folders already moved are moved back, so nothing of the version
stays. Version numbers are never reused.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pigeon.config import PipelineConfig, ServingConfig
from pigeon.export.errors import ExportError
from pigeon.export.manifest import MANIFEST, read_manifest
from pigeon.files import staging_dir, write_atomic
from pigeon.serving.triton_backend import PIPELINE_DIR, model_py
from pigeon.serving.triton_config import PYTHON_MODELS, repository_configs

log = logging.getLogger(__name__)


def write_configs(
    repository: Path, config: PipelineConfig, serving: ServingConfig, target: str
) -> list[Path]:
    """(Re)generate every model's config.pbtxt under `repository` (one target's folder)."""
    written = []
    for name, text in repository_configs(config, serving, target).items():
        path = repository / name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(write_atomic(path, text))
    return written


def versions(repository: Path, model: str) -> list[int]:
    folder = repository / model
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _copy_pipeline_files(checkpoint: Path, into: Path) -> None:
    """The checkpoint minus its weights: what the Python models need to rebuild the pipeline."""
    into.mkdir()
    shutil.copyfile(checkpoint / "pipeline.json", into / "pipeline.json")
    for config in checkpoint.glob("*/config.json"):
        (into / config.parent.name).mkdir()
        shutil.copyfile(config, into / config.parent.name / "config.json")
    shutil.copytree(checkpoint / "tokenizer", into / "tokenizer")


def publish_version(
    repository: Path, checkpoint: Path, artifacts: Path, version: int
) -> list[Path]:
    """Publish validated ONNX artifacts + the checkpoint's configs as version `version` of every
    model in `repository` (one target's folder). Returns the new version folders."""
    if version < 1:
        raise ExportError(f"version={version} must be >= 1 (Triton version folders are positive)")
    manifest = read_manifest(artifacts)
    models = [*manifest["components"], *PYTHON_MODELS, "pigeon"]  # the ensemble last: the commit
    taken = [m for m in models if (repository / m / str(version)).exists()]
    if taken:
        raise ExportError(
            f"version {version} already exists for {taken[0]} in {repository}; "
            "versions are never reused"
        )
    staged: dict[str, Path] = {}
    moved: list[tuple[Path, Path]] = []
    try:
        for model in models:
            folder = staging_dir(repository / model / str(version))
            staged[model] = folder
            if model in manifest["components"]:
                for file in (artifacts / model).iterdir():
                    shutil.copyfile(file, folder / file.name)
                shutil.copyfile(artifacts / MANIFEST, folder / MANIFEST)
            elif model in PYTHON_MODELS:
                _copy_pipeline_files(Path(checkpoint), folder / PIPELINE_DIR)
            if model != "pigeon":
                (folder / "model.py").write_text(model_py(model))
        for model, folder in staged.items():
            target = repository / model / str(version)
            folder.rename(target)
            moved.append((target, folder))
    except BaseException:
        for target, folder in reversed(moved):
            target.rename(folder)
        for folder in staged.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    log.info("published version %d of %d models in %s", version, len(models), repository)
    return [t for t, _ in moved]
