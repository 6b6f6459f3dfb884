"""The benchmark scripts keep working (quick mode on the tiny preset). Nothing here is timed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# each runs a benchmark script end to end: make test-all
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_serving_quick_writes_a_complete_record(tmp_path):
    run(
        "benchmarks.serving",
        "--preset",
        "tiny",
        "--quick",
        "--workdir",
        str(tmp_path / "w"),
        "--results",
        str(tmp_path / "r"),
    )
    record = json.loads((tmp_path / "r" / "serving.jsonl").read_text().splitlines()[-1])
    assert record["quick"] and record["preset"] == "tiny"
    assert {
        "default/grpc/c1",
        "default/http/c2",
        "unet-batched/grpc/c2",
        "unet-unbatched/grpc/c2",
        "cache/new",
        "cache/returning",
    } <= set(record["levels"])
    assert all(not level["errors"] for level in record["levels"].values())
    returning = record["levels"]["cache/returning"]["models"]["history_encoder"]
    assert returning["cache_hits"] >= 1  # the same history twice is served from the cache
    assert sum(record["flops_per_request"].values()) > 0 < record["machine_peak_flops"]


def test_components_and_pipeline_benchmarks_run(tmp_path):
    workdir = str(tmp_path / "w")
    run(
        "benchmarks.components",
        "--preset",
        "tiny",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--workdir",
        workdir,
        "--out",
        str(tmp_path / "c.jsonl"),
    )
    rows = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    from pigeon.config import preset
    from pigeon.specs import component_specs

    assert {r["backend"] for r in rows} == {"pytorch", "onnxruntime"}
    assert len(rows) == 2 * len(component_specs(preset("tiny")))  # each component, both backends
    run(
        "benchmarks.pipeline",
        "--preset",
        "tiny",
        "--runs",
        "1",
        "--warmup",
        "1",
        "--workdir",
        workdir,
        "--out",
        str(tmp_path / "p.jsonl"),
    )
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["pytorch", "onnxruntime"]


def test_gpu_check_dry_runs_on_the_cpu(tmp_path):
    """The GPU script's CPU path (what a lent GPU runs, minus CUDA): every phase that can run here
    is ok, the GPU-only ones say why they were skipped, and the device image is the CPU image."""
    out = tmp_path / "g.jsonl"
    run(
        "benchmarks.gpu_check",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--runs",
        "2",
        "--pipeline-runs",
        "1",
        "--workdir",
        str(tmp_path / "w"),
        "--out",
        str(out),
    )
    (record,) = [json.loads(x) for x in out.read_text().splitlines()]
    phases = record["phases"]
    assert phases["components (eager)"].startswith("ok")
    assert phases["ONNX export + validation"].startswith("ok")
    assert phases["TensorRT engines"].startswith("skipped") and "GPU" in phases["TensorRT engines"]
    assert record["pipeline"]["fp32"]["max_pixel_diff_vs_cpu"] == 0
    from pigeon.config import preset
    from pigeon.specs import component_specs

    assert set(record["components"]) == set(component_specs(preset("tiny")))
