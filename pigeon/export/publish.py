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
    precision: str | None = None,
    variant: str = "default",
    fused_attention: bool = False,
    components: list[str] | None = None,
    model_hook=None,
    calibration=None,
    strict: bool = False,
) -> dict:
    """Export + validate + publish into `repository/target`; returns the manifest.

    int8 and mixed (pigeon.export.quantize) are CPU variants: ONNX Runtime runs them on the `cpu`
    target; the `gpu` target builds TensorRT engines from fp32/fp16 files. `variant`
    (pigeon.export.variants): a named precision with the sampling defaults that every Python model
    of the version serves."""
    from pigeon.checkpoint import load_checkpoint
    from pigeon.export.artifacts import export_onnx
    from pigeon.export.variants import resolve
    from pigeon.serving.repository import publish_version, write_configs

    precision, _ = resolve(variant, precision)
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
            variant=variant,
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


def publish_lora(
    base_checkpoint: str | Path,
    adapter: str | Path,
    repository: str | Path,
    version: int,
    *,
    base_version: int | None = None,
    target: str = "cpu",
) -> dict:
    """A new version that changes only the personalizer's LoRA (`pigeon deploy --lora`).

    The adapter (a PEFT folder, e.g. from `pigeon train sft --lora-only` then `pigeon checkpoint
    export-peft`) is merged into `base_checkpoint`, which must be the checkpoint `base_version`
    serves (its SHA-256 is in that version's manifest). Only the personalizer is exported and
    validated; every other network's files are the base version's, copied byte for byte; the
    Python models get the new checkpoint's configs. The new version is then published atomically as
    any other, and `deploy` / `rollback` switch to and from it. An adapter whose rank or target
    modules differ from the base's LoRA is refused by name: the personalizer's graph, and a TensorRT
    engine built from it, keep their weight shapes, which is what a refit needs."""
    import json

    from pigeon.checkpoint import load_checkpoint
    from pigeon.export.artifacts import export_onnx
    from pigeon.export.manifest import MANIFEST, read_manifest
    from pigeon.interop import import_weights, peft_config
    from pigeon.serving.repository import publish_version, versions

    root = Path(repository) / target
    base = load_checkpoint(base_checkpoint)
    published = versions(root, "personalizer")
    if base_version is None:
        if not published:
            raise ExportError(f"{root}: no published version to build the LoRA version on")
        base_version = published[-1]
    base_manifest = read_manifest(root / "personalizer" / str(base_version), verify=False)
    if base_manifest["checkpoint_sha256"] != base.digest:
        raise ExportError(
            f"--checkpoint {base_checkpoint} (sha256 {base.digest[:12]}) is not the checkpoint of "
            f"version {base_version} (sha256 {base_manifest['checkpoint_sha256'][:12]}): a LoRA "
            "is merged into the weights the version serves"
        )
    wanted = peft_config(Path(adapter), base.config).personalizer
    have = base.config.personalizer
    if (wanted.lora_rank, wanted.lora_alpha) != (have.lora_rank, have.lora_alpha):
        raise ExportError(
            f"--lora {adapter}: rank {wanted.lora_rank} (alpha {wanted.lora_alpha}); version "
            f"{base_version}'s personalizer has rank {have.lora_rank} (alpha {have.lora_alpha})"
        )
    staging = staging_dir(Path(repository) / f"{target}-v{version}-lora")
    try:
        merged = staging / "checkpoint"
        import_weights(merged, base=base_checkpoint, peft=adapter)
        precision = base_manifest["precision"] if base_manifest["precision"] == "fp16" else "fp32"
        export_onnx(
            merged, staging / "personalizer", precision=precision, components=["personalizer"]
        )
        fresh = read_manifest(staging / "personalizer")
        artifacts = staging / "artifacts"
        artifacts.mkdir()
        components = {}
        for name, entry in base_manifest["components"].items():
            source = fresh if name == "personalizer" else base_manifest
            folder = (
                staging / "personalizer" / name
                if name == "personalizer"
                else root / name / str(base_version)
            )
            (artifacts / name).mkdir()
            for file in source["components"][name]["files"]:
                shutil.copyfile(folder / file, artifacts / name / file)
            components[name] = source["components"][name] if name == "personalizer" else entry
        manifest = {
            **base_manifest,
            "checkpoint": str(merged),
            "checkpoint_sha256": fresh["checkpoint_sha256"],
            "components": components,
            "lora": {
                "adapter": str(adapter),
                "base_version": base_version,
                "base_checkpoint_sha256": base.digest,
            },
        }
        (artifacts / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        read_manifest(artifacts)  # every copied file against its recorded hash
        publish_version(root, merged, artifacts, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
