"""The `pigeon` command as a user runs it: a real subprocess, JSON on stdout, errors on stderr."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import emoji_like


def pigeon(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "pigeon.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("png")
    paths = []
    for i in range(4):
        path = folder / f"img{i}.png"
        Image.fromarray(emoji_like(i, alpha=i % 2 == 0), "RGBA" if i % 2 == 0 else "RGB").save(path)
        paths.append(str(path))
    return paths


@pytest.mark.integration
def test_init_generate_inspect(tmp_path, pngs):
    ckpt = tmp_path / "ckpt"
    res = pigeon("init", "--preset", "tiny", "--out", str(ckpt))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["preset"] == "tiny"
    out = tmp_path / "o.png"
    res = pigeon(
        "generate",
        "--checkpoint",
        str(ckpt),
        "--history",
        *pngs[:3],
        "--reference",
        pngs[3],
        "--text",
        "a smiling cat",
        "--out",
        str(out),
        "--steps",
        "3",
        "--seed",
        "1",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["out"] == str(out) and summary["peak_rss_mib"] > 0
    assert Image.open(out).size == (32, 32)
    res = pigeon("checkpoint", "inspect", str(ckpt))
    info = json.loads(res.stdout)
    assert res.returncode == 0 and info["verified"] and "unet" in info["components"]
    assert (
        sum(c["parameters"] for c in info["components"].values())
        == json.loads(pigeon("init", "--out", str(tmp_path / "c2")).stdout)["parameters"]
    )


@pytest.mark.integration
def test_export_onnx_then_generate_on_its_files_as_the_readme_runs_them(tmp_path, pngs):
    """`pigeon export onnx` at its default (fp32, no calibration) and `pigeon generate --backend
    onnxruntime` on the result: the image matches the PyTorch backend's within 2/255."""
    ckpt, artifacts = tmp_path / "ckpt", tmp_path / "art"
    assert pigeon("init", "--preset", "tiny", "--out", str(ckpt)).returncode == 0
    res = pigeon("export", "onnx", "--checkpoint", str(ckpt), "--out", str(artifacts))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["precision"], summary["variant"], summary["sampling_defaults"]) == (
        "fp32",
        "default",
        {},
    )
    images = []
    for backend in ("pytorch", "onnxruntime"):
        out = tmp_path / f"{backend}.png"
        extra = ["--artifacts", str(artifacts)] if backend == "onnxruntime" else []
        res = pigeon(
            "generate", "--checkpoint", str(ckpt), "--history", *pngs[:3], "--reference", pngs[3],
            "--text", "a smiling cat", "--out", str(out), "--steps", "3", "--seed", "1",
            "--backend", backend, *extra,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        images.append(np.asarray(Image.open(out).convert("RGB"), dtype=int))
    assert np.abs(images[0] - images[1]).max() <= 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["init", "--preset", "huge", "--out", "x"], "unknown preset 'huge'"),
        (["config", "show", "--set", "unet.depth=3"], "unknown key 'depth'"),
        (["checkpoint", "inspect", "/nonexistent"], "no such directory"),
    ],
)
@pytest.mark.integration
def test_errors_exit_non_zero_with_one_line(args, message):
    res = pigeon(*args)
    assert res.returncode == 2 and message in res.stderr and res.stdout == ""


def test_generate_names_a_missing_image(tmp_path, pngs):
    res = pigeon(
        "generate",
        "--checkpoint",
        str(tmp_path),
        "--history",
        "missing.png",
        "--reference",
        pngs[0],
        "--text",
        "x",
        "--out",
        str(tmp_path / "o.png"),
    )
    assert res.returncode == 2 and "missing.png: file not found" in res.stderr
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--device", "cuda"], "--device cuda: torch sees no CUDA GPU"),
        (["--device", "gpu"], "--device 'gpu' is not a torch device"),
        (["--backend", "onnxruntime", "--compile"], "are PyTorch-backend settings"),
    ],
)
@pytest.mark.integration
def test_generate_refuses_device_settings_it_cannot_honour(tmp_path, pngs, extra, message):
    import torch

    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "o.png"
    res = pigeon(
        "generate",
        "--checkpoint",
        str(tmp_path),
        "--history",
        pngs[0],
        "--reference",
        pngs[1],
        "--text",
        "x",
        "--out",
        str(out),
        *extra,
    )
    assert res.returncode == 2 and message in res.stderr and not out.exists()
