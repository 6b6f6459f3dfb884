"""A full disk is a real OS refusal: the write runs in a subprocess whose file size limit
(RLIMIT_FSIZE) makes the kernel fail it with EFBIG, or, where user namespaces allow a mount, on a
small tmpfs that fails it with ENOSPC. Nothing is lost or half-written."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pigeon.checkpoint import load_checkpoint, save_checkpoint
from pigeon.export.manifest import read_manifest
from pigeon.files import sha256_file, write_atomic
from pigeon.serving.repository import publish_version
from pigeon.serving.triton_backend import verify_version_files

from ..conftest import make_model
from .support import (
    ROOT,
    STARTUP_S,
    make_repository,
)


def run_limited(code: str, max_file_bytes: int) -> subprocess.CompletedProcess:
    """Run Python `code` in a subprocess whose writes beyond `max_file_bytes` per file fail with
    EFBIG (RLIMIT_FSIZE; SIGXFSZ ignored so the write returns the error instead of killing it)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
        env=env,
        cwd=ROOT,
    )


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p) if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_full_disk_while_publishing_publishes_nothing(tmp_path, checkpoint_dir, artifacts):
    repo = make_repository(tmp_path, checkpoint_dir, artifacts)
    before = tree(repo)
    sizes = sorted(p.stat().st_size for p in artifacts.rglob("*.onnx"))
    limit = sizes[-1] // 2  # the largest network's copy fails half way, after smaller ones
    res = run_limited(
        "from pathlib import Path\n"
        "from pigeon.serving.repository import publish_version\n"
        f"publish_version(Path({str(repo)!r}), Path({str(checkpoint_dir)!r}), "
        f"Path({str(artifacts)!r}), 2)\n",
        limit,
    )
    assert res.returncode != 0 and "File too large" in res.stderr, res.stderr[-2000:]
    assert tree(repo) == before  # no version 2 folder, no staging folder, version 1 untouched
    publish_version(repo, checkpoint_dir, artifacts, 2)  # with room again, it publishes
    for network in read_manifest(artifacts)["components"]:
        verify_version_files(repo / network / "2", network)


@pytest.mark.integration
def test_full_disk_while_exporting_publishes_nothing(tmp_path, checkpoint_dir, artifacts):
    make_repository(tmp_path, checkpoint_dir, artifacts)  # a served version 1 beside it
    before = tree(tmp_path)
    res = run_limited(
        "from pigeon.export.publish import export_all\n"
        f"export_all({str(checkpoint_dir)!r}, {str(tmp_path)!r}, 2)\n",
        64 * 1024,  # the first ONNX file written is larger
    )
    assert res.returncode != 0 and "File too large" in res.stderr, res.stderr[-2000:]
    assert "onnx_export.py" in res.stderr  # it failed writing the export, not elsewhere
    assert tree(tmp_path) == before


@pytest.mark.integration
def test_full_disk_while_exporting_field_formats_leaves_no_folder(tmp_path, checkpoint_dir):
    """`pigeon checkpoint export-diffusers` / `export-peft` write into a staging folder: a write that
    fails half way leaves neither the --out folder nor the staging folder behind."""
    for command in ("export-diffusers", "export-peft"):
        out = tmp_path / command
        res = run_limited(
            "from pigeon.cli import main\n"
            f"raise SystemExit(main(['checkpoint', {command!r}, {str(checkpoint_dir)!r}, "
            f"'--out', {str(out)!r}]))\n",
            16 * 1024,
        )
        assert res.returncode != 0 and "File too large" in res.stderr, res.stderr[-2000:]
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


@pytest.mark.integration
def test_full_disk_while_saving_a_checkpoint_keeps_the_old_one(tmp_path, tiny_config, tokenizer):
    path = save_checkpoint(make_model(tiny_config, seed=1), tokenizer, tmp_path / "ckpt")
    digest = load_checkpoint(path).digest
    res = run_limited(
        "import torch\n"
        "from tests.conftest import make_model\n"
        "from pigeon.config import preset\n"
        "from pigeon.checkpoint import save_checkpoint\n"
        "from pigeon.vocab import TextTokenizer\n"
        f"tok = TextTokenizer.load({str(path / 'tokenizer' / 'tokenizer.json')!r}, "
        f"{tiny_config.personalizer.text_vocab_size})\n"
        f"save_checkpoint(make_model(preset('tiny'), seed=2), tok, {str(path)!r}, overwrite=True)\n",
        64 * 1024,
    )
    assert res.returncode != 0 and "File too large" in res.stderr, res.stderr[-2000:]
    assert load_checkpoint(path).digest == digest  # the old checkpoint, whole and verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folder left
    target = tmp_path / "small.json"
    write_atomic(target, "old\n")
    res = run_limited(
        f"from pigeon.files import write_atomic\nwrite_atomic({str(target)!r}, 'x' * 100000)\n",
        1024,
    )
    assert res.returncode != 0 and target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "small.json"]


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs -o size=64k tmpfs /tmp && echo ok",
        ],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() == "ok"


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespace with mount rights here")
def test_no_space_left_on_a_small_tmpfs_publishes_nothing(tmp_path, checkpoint_dir, artifacts):
    """A real ENOSPC: the repository lives on a tmpfs too small for a version."""
    mount = tmp_path / "disk"
    mount.mkdir()
    total = sum(p.stat().st_size for p in artifacts.rglob("*") if p.is_file())
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from pigeon.checkpoint import load_config\n"
        "from pigeon.config import ServingConfig\n"
        "from pigeon.serving.repository import publish_version, write_configs\n"
        f"repo = Path({str(mount)!r}) / 'cpu'\n"
        f"write_configs(repo, load_config({str(checkpoint_dir)!r}), ServingConfig(), 'cpu')\n"
        "try:\n"
        f"    publish_version(repo, Path({str(checkpoint_dir)!r}), Path({str(artifacts)!r}), 1)\n"
        "    error = None\n"
        "except OSError as exc:\n"
        "    error = str(exc)\n"
        "files = sorted(str(p.relative_to(repo)) for p in repo.rglob('*'))\n"
        "print(json.dumps({'error': error, 'files': files}))\n"
    )
    res = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            f'mount -t tmpfs -o size={total // 2} tmpfs {mount} && exec {sys.executable} -c "$0"',
            code,
        ],
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"] and "No space left on device" in out["error"], res.stderr[-2000:]
    assert all(name.endswith("config.pbtxt") or "/" not in name for name in out["files"]), out
