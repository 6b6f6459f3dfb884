import json
import pickle
import shutil

import numpy as np
import pytest
from safetensors import safe_open

from pigeon.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pigeon.inference.runners import TorchRunner
from pigeon.specs import component_specs, sample_inputs

from .conftest import make_model


def test_round_trip_gives_identical_outputs_for_every_component(checkpoint_dir, tiny_config):
    original = TorchRunner(make_model(tiny_config))
    loaded = TorchRunner(load_checkpoint(checkpoint_dir).model)
    for name, spec in component_specs(tiny_config).items():
        feeds = sample_inputs(spec, tiny_config, "opt", seed=1)
        a, b = original.run(name, feeds), loaded.run(name, feeds)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}.{key}")


def test_layout_index_and_self_describing_weights(checkpoint_dir):
    index = json.loads((checkpoint_dir / "pipeline.json").read_text())
    assert index["_format"] == 1 and index["preset"] == "tiny"
    assert (
        "unet/model.safetensors" in index["files"] and "tokenizer/tokenizer.json" in index["files"]
    )
    with safe_open(str(checkpoint_dir / "unet" / "model.safetensors"), "np") as f:
        meta = json.loads(f.metadata()["config"])
    assert meta["_class"] == "UNetConfig"


def test_loading_never_unpickles(checkpoint_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert load_checkpoint(checkpoint_dir).config.preset == "tiny"


@pytest.fixture
def copy(checkpoint_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(checkpoint_dir, target)
    return target


def test_missing_file_is_named(copy):
    (copy / "vae" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vae/model.safetensors: missing"):
        load_checkpoint(copy)


def test_altered_file_is_named(copy):
    path = copy / "personalizer" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"personalizer/model.safetensors: SHA-256 differs"):
        load_checkpoint(copy)


def test_altered_config_is_named(copy):
    path = copy / "unet" / "config.json"
    path.write_text(path.read_text().replace('"layers_per_block": 1', '"layers_per_block": 2'))
    with pytest.raises(CheckpointError, match=r"unet/config.json: SHA-256 differs"):
        load_checkpoint(copy)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "none")
    with pytest.raises(CheckpointError, match="pipeline.json: missing"):
        load_checkpoint(tmp_path)


def test_save_refuses_to_overwrite_and_replaces_atomically(
    checkpoint_dir, tiny_config, tokenizer, tmp_path
):
    target = tmp_path / "ck"
    save_checkpoint(make_model(tiny_config, seed=1), tokenizer, target)
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(make_model(tiny_config), tokenizer, target)
    save_checkpoint(make_model(tiny_config, seed=2), tokenizer, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging folders left
    load_checkpoint(target)


def test_half_precision_storage_halves_the_files_and_loads_as_float32(
    checkpoint_dir, tmp_path, tiny_config
):
    from pigeon.cli import main

    half = tmp_path / "half"
    assert (
        main(
            ["checkpoint", "convert", str(checkpoint_dir), "--out", str(half), "--dtype", "float16"]
        )
        == 0
    )

    def size(path):
        return sum(f.stat().st_size for f in path.rglob("*.safetensors"))

    assert size(half) < 0.55 * size(checkpoint_dir)
    full, loaded = load_checkpoint(checkpoint_dir), load_checkpoint(half)
    assert all(
        p.dtype.is_floating_point is False or str(p.dtype) == "torch.float32"
        for p in loaded.model.parameters()
    )
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        if a.is_floating_point():  # float16 rounding: relative error below 2**-10
            assert (a - b).abs().max() <= a.abs().max() * 1e-3 + 1e-6, name
    with pytest.raises(CheckpointError, match="storage_dtype='int8'"):
        save_checkpoint(full.model, full.tokenizer, tmp_path / "x", storage_dtype="int8")


def test_convert_sets_sampling_defaults_but_refuses_architecture_keys(checkpoint_dir, tmp_path):
    from pigeon.cli import main

    out = tmp_path / "img2img"
    args = ["checkpoint", "convert", str(checkpoint_dir), "--out", str(out)]
    assert main([*args, "--set", "scheduler.strength=0.6", "--set", "generation.top_k=7"]) == 0
    config = load_checkpoint(out).config
    assert (config.scheduler.strength, config.generation.top_k) == (0.6, 7)
    assert config.unet == load_checkpoint(checkpoint_dir).config.unet
    refused = tmp_path / "refused"
    assert main([*args[:-1], str(refused), "--set", "unet.layers_per_block=3"]) != 0
    assert not refused.exists()
