"""Checkpoints: one folder per component (`config.json` + `model.safetensors`) and a `pipeline.json` index.

    CKPT/pipeline.json                    format, preset, image size, every file with its SHA-256
    CKPT/<component>/config.json          strict component config (see pigeon.config)
    CKPT/<component>/model.safetensors    weights, with the config JSON in the metadata
    CKPT/scheduler/config.json, CKPT/generation/config.json
    CKPT/tokenizer/tokenizer.json         the instruction-text tokenizer

Loading never unpickles, and checks every file against the index before using it: a missing or altered
file is a `CheckpointError` that names it. Saving writes a sibling folder and renames it into place, so a
reader never sees half a checkpoint. Reading configs (`load_config`) needs no torch, so the Triton
Python models can use it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pigeon import config as cfg
from pigeon.files import hash_mismatch, replace_dir, sha256_file, staging_dir
from pigeon.vocab import TextTokenizer

INDEX = "pipeline.json"
CONFIG_ONLY = ("scheduler", "generation")
CONFIG_CLASSES = {
    "history_encoder": cfg.HistoryEncoderConfig,
    "mask_generator": cfg.MaskGeneratorConfig,
    "personalizer": cfg.PersonalizerConfig,
    "condition_adapter": cfg.ConditionAdapterConfig,
    "unet": cfg.UNetConfig,
    "vae": cfg.VAEConfig,
    "scheduler": cfg.SchedulerConfig,
    "generation": cfg.GenerationConfig,
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file."""


@dataclass
class Checkpoint:
    config: cfg.PipelineConfig
    model: Any  # PigeonModel
    tokenizer: TextTokenizer
    path: Path
    digest: str  # SHA-256 of pipeline.json: identifies the exact checkpoint


def unwrap(module: Any) -> Any:
    """Strip DistributedDataParallel / torch.compile wrappers before saving."""
    import torch

    while True:
        if hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def save_checkpoint(
    model: Any,
    tokenizer: TextTokenizer,
    path: str | Path,
    *,
    overwrite: bool = False,
    extra: dict | None = None,
    storage_dtype: str = "float32",
) -> Path:
    """Write `model` and `tokenizer` to `path` atomically; returns the path.

    storage_dtype "float16" or "bfloat16" halves the files (for publishing or committing a checkpoint;
    loading casts back to float32). Training keeps float32 so that resuming is exact.
    """
    import torch
    from safetensors.torch import save_file

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if storage_dtype not in dtypes:
        raise CheckpointError(f"storage_dtype={storage_dtype!r} is not one of {sorted(dtypes)}")

    path = Path(path)
    model = unwrap(model)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    staging = staging_dir(path)
    try:
        config = model.config
        files: dict[str, str] = {}
        for name in cfg.COMPONENT_MODULES + CONFIG_ONLY:
            (staging / name).mkdir()
            component_config = getattr(config, name)
            cfg.save_json(component_config, staging / name / "config.json")
            files[f"{name}/config.json"] = ""
            if name in cfg.COMPONENT_MODULES:
                state = {
                    k: (v.to(dtypes[storage_dtype]) if v.is_floating_point() else v)
                    .detach()
                    .contiguous()
                    .cpu()
                    for k, v in getattr(model, name).state_dict().items()
                }
                metadata = {"config": json.dumps(cfg.to_dict(component_config))}
                save_file(state, staging / name / "model.safetensors", metadata=metadata)
                files[f"{name}/model.safetensors"] = ""
        (staging / "tokenizer").mkdir()
        tokenizer.save(staging / "tokenizer" / "tokenizer.json")
        files["tokenizer/tokenizer.json"] = ""
        index = {
            "_class": "PigeonCheckpoint",
            "_format": cfg.CONFIG_FORMAT,
            "preset": config.preset,
            "storage_dtype": storage_dtype,
            "image_size": config.image_size,
            "files": {rel: sha256_file(staging / rel) for rel in sorted(files)},
            **({"extra": extra} if extra else {}),
        }
        (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def read_index(path: Path) -> dict:
    index_path = path / INDEX
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (no such directory)")
    if not index_path.is_file():
        raise CheckpointError(f"{index_path}: missing; not a Pigeon checkpoint")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index_path}: not valid JSON ({exc})") from None
    for key in ("_class", "_format", "preset", "image_size", "files"):
        if key not in index:
            raise CheckpointError(f"{index_path}: missing key {key!r}")
    if index["_format"] != cfg.CONFIG_FORMAT:
        raise CheckpointError(f"{index_path}: _format={index['_format']!r} is not supported")
    return index


def verify_files(path: Path, index: dict) -> None:
    """Every indexed file exists and has the recorded SHA-256."""
    problem = hash_mismatch(path, index["files"], INDEX)
    if problem:
        raise CheckpointError(problem)


def verify_pipeline_files(path: str | Path, index_sha256: str | None = None) -> None:
    """A checkpoint folder without its weights, as published for Triton's Python models: the index
    (`pipeline.json`) has the SHA-256 `index_sha256` (the version manifest's `checkpoint_sha256`),
    and every config and the tokenizer it lists are present with their recorded SHA-256."""
    path = Path(path)
    index = read_index(path)
    if index_sha256 is not None and sha256_file(path / INDEX) != index_sha256:
        raise CheckpointError(
            f"{path / INDEX}: SHA-256 differs from the version's manifest; refusing to load an "
            "altered file"
        )
    listed = {rel: h for rel, h in index["files"].items() if not rel.endswith(".safetensors")}
    problem = hash_mismatch(path, listed, INDEX)
    if problem:
        raise CheckpointError(problem)


def load_config(path: str | Path) -> cfg.PipelineConfig:
    path = Path(path)
    index = read_index(path)
    parts = {
        name: cfg.load_json(cls, path / name / "config.json")
        for name, cls in CONFIG_CLASSES.items()
    }
    try:
        return cfg.PipelineConfig(preset=index["preset"], image_size=index["image_size"], **parts)
    except cfg.ConfigError as exc:
        raise CheckpointError(f"{path}: inconsistent component configs: {exc}") from None


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Load a checkpoint folder (verifying every file's hash first)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pigeon.models.pigeon import PigeonModel

    path = Path(path)
    index = read_index(path)
    if verify:
        verify_files(path, index)
    config = load_config(path)
    model = PigeonModel(config)
    for name in cfg.COMPONENT_MODULES:
        file = path / name / "model.safetensors"
        try:
            state = load_file(file)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: unreadable weights ({exc})") from None
        try:
            module = getattr(model, name)
            reference = module.state_dict()
            state = {
                k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()
            }  # float16/bfloat16 storage -> the model's dtype
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{file}: weights do not fit the config ({exc})") from None
    tokenizer = TextTokenizer.load(
        path / "tokenizer" / "tokenizer.json", config.personalizer.text_vocab_size
    )
    return Checkpoint(config, model.eval(), tokenizer, path, sha256_file(path / INDEX))
