"""Shared benchmark helpers: warm-up then timed runs, percentiles, environment, JSON lines."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def percentiles(values: list[float]) -> dict[str, float]:
    v = np.asarray(values)
    return {
        "p50": float(np.percentile(v, 50)),
        "p90": float(np.percentile(v, 90)),
        "p95": float(np.percentile(v, 95)),
        "p99": float(np.percentile(v, 99)),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": len(v),
    }


def measure(fn: Callable[[], object], warmup: int, runs: int) -> dict[str, float]:
    """Seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return percentiles(times)


def environment() -> dict:
    import onnxruntime
    import torch

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def append_jsonl(path: str | Path, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def workdir_for(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The default work folder of a preset with `--set` overrides (one folder per distinct set)."""
    if not overrides:
        return f"runs/bench-{preset}"
    import hashlib

    return f"runs/bench-{preset}-{hashlib.sha1(' '.join(overrides).encode()).hexdigest()[:8]}"


def prepare(
    preset: str,
    workdir: str | Path,
    precision: str = "fp32",
    overrides: list[str] | tuple[str, ...] = (),
) -> tuple[Path, Path]:
    """A checkpoint of `preset` with `overrides` (random init unless one exists) and its ONNX
    artifacts, reused when present. Returns (checkpoint, artifacts)."""
    from pigeon.checkpoint import save_checkpoint
    from pigeon.config import apply_overrides
    from pigeon.config import preset as make_preset
    from pigeon.models.pigeon import PigeonModel
    from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

    workdir = Path(workdir)
    checkpoint, artifacts = workdir / "checkpoint", workdir / f"onnx-{precision}"
    if not (checkpoint / "pipeline.json").exists():
        import torch

        config = apply_overrides(make_preset(preset), list(overrides))
        torch.manual_seed(0)
        size = config.personalizer.text_vocab_size
        save_checkpoint(
            PigeonModel(config),
            TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, size), size),
            checkpoint,
        )
    export_artifacts(checkpoint, artifacts, precision)
    return checkpoint, artifacts


def checkpoint_and_artifacts(
    checkpoint: str | None, preset: str, workdir: Path
) -> tuple[Path, Path]:
    """`checkpoint` (e.g. checkpoints/small) with its ONNX export in `workdir`, or, without one, a
    random checkpoint of `preset` (`prepare`). Returns (checkpoint, artifacts)."""
    if checkpoint is None:
        return prepare(preset, workdir)
    artifacts = workdir / "onnx-fp32"
    export_artifacts(Path(checkpoint), artifacts)
    return Path(checkpoint), artifacts


def run_threads(workers: list[Callable[[], None]]) -> float:
    """Run each worker in its own thread, all at once; the wall seconds until the last ends."""
    import threading

    start = time.perf_counter()
    threads = [threading.Thread(target=w) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def ensemble_counts(url: str) -> tuple[int, int]:
    """The server's own (success, fail) counts of `pigeon` ensemble requests (gRPC url)."""
    from pigeon.serving.client import PigeonClient

    with PigeonClient(url, "grpc", timeout_s=30) as client:
        stats = client.statistics("pigeon")["model_stats"]
    counts = [s["inference_stats"] for s in stats]
    success, fail = (
        sum(int(c.get(k, {}).get("count", 0)) for c in counts) for k in ("success", "fail")
    )
    return success, fail


def export_artifacts(checkpoint: Path, artifacts: Path, precision: str = "fp32") -> None:
    """Export and validate `checkpoint` into `artifacts` unless an export of it is there already."""
    from pigeon.export.artifacts import export_onnx

    if stale(artifacts, checkpoint):
        export_onnx(checkpoint, artifacts, precision=precision, overwrite=True)


def stale(artifacts: Path, checkpoint: Path) -> bool:
    """No artifacts yet, or ones made from another checkpoint or missing a declared component (an
    older export)."""
    import json

    from pigeon.checkpoint import load_checkpoint
    from pigeon.specs import component_specs

    manifest = artifacts / "manifest.json"
    if not manifest.exists():
        return True
    built = json.loads(manifest.read_text())
    ckpt = load_checkpoint(checkpoint)
    return built["checkpoint_sha256"] != ckpt.digest or set(built["components"]) != set(
        component_specs(ckpt.config)
    )


def procedural_request(size: int, steps: int | None = None):
    """One user's request from the procedural shapes set (seeded)."""
    from pigeon.data.procedural import render, sample_user
    from pigeon.inference.pipeline import GenerationRequest

    user = sample_user(np.random.default_rng(0))
    return GenerationRequest(
        history=[render(c, s, size) for c, s in user.history],
        reference=render(*user.reference, size),
        text=user.text,
        steps=steps,
    )
