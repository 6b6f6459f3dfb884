"""Shared fixtures: the tiny preset, a seeded model, a saved checkpoint and small real images."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from pigeon.checkpoint import save_checkpoint
from pigeon.config import preset
from pigeon.models.pigeon import PigeonModel
from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

# What starts a real tritonserver: these fixtures, or these calls in the test's own code. Such tests
# get the `triton` marker whatever file they are in, so `-m "not triton"` is the fast lane.
SERVER_FIXTURES = {"served"}
STARTS_A_SERVER = ("TritonServer(", "run_load_tool(", "run_tool(")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        function = getattr(item, "function", None)
        if function is None:
            continue
        source = inspect.getsource(function)
        if SERVER_FIXTURES & set(item.fixturenames) or any(s in source for s in STARTS_A_SERVER):
            item.add_marker(pytest.mark.triton)


@pytest.fixture(scope="session")
def tiny_config():
    return preset("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_config):
    size = tiny_config.personalizer.text_vocab_size
    return TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, size), size)


def make_model(config, seed: int = 0) -> PigeonModel:
    torch.manual_seed(seed)
    return PigeonModel(config).eval()


@pytest.fixture
def tiny_model(tiny_config):
    return make_model(tiny_config)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, tiny_config, tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(make_model(tiny_config), tokenizer, path)


def emoji_like(seed: int, size: int = 40, alpha: bool = False) -> np.ndarray:
    """A small coloured shape on white (or transparent) background, like an EmojiPrefs image."""
    rng = np.random.default_rng(seed)
    channels = 4 if alpha else 3
    img = (
        np.zeros((size, size, channels), np.uint8)
        if alpha
        else np.full((size, size, 3), 255, np.uint8)
    )
    y, x = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(size // 3, 2 * size // 3, 2).tolist() + [
        int(rng.integers(6, size // 3))
    ]
    disk = (y - cy) ** 2 + (x - cx) ** 2 < r * r
    img[disk, :3] = rng.integers(0, 255, 3)
    if alpha:
        img[disk, 3] = 255
    return img


@pytest.fixture
def images():
    return [emoji_like(i) for i in range(6)]
