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


def test_train_step_benchmark_warms_one_entry_per_distinct_image(tmp_path):
    """benchmarks.train_step on the tiny preset: an arm per cache state, and the warm cache holds
    the latents of exactly the distinct images of the batches it cycled (counted here from the same
    batches)."""
    import dataclasses

    from pigeon.config import preset
    from pigeon.training.data import load_data
    from pigeon.training.loop import Dist, make_batch, recipe

    run(
        "benchmarks.train_step",
        *("--stage", "image", "--preset", "tiny", "--data", "procedural"),
        *("--batches", "3", "--runs", "1", "--out", str(tmp_path / "t.jsonl")),
    )
    rows = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["off", "warm", "fill"]
    config = dataclasses.replace(recipe("tiny")["image"], style_weight=1.0)
    data = load_data("procedural", preset("tiny").image_size)
    images = [make_batch(data, config, k, Dist(), "cpu")["images"] for k in range(3)]
    distinct = {row.numpy().tobytes() for batch in images for row in batch}
    assert rows[1]["cache"]["images"] == len(distinct) == rows[1]["cache"]["encoded"]


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


PERF_ANALYZER_ROW = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
    "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
    "p50 latency,p90 latency,p95 latency,p99 latency\n"
    "1,23.0915,9,711,3,232,40127,2010,4,42722,48616,53060,55309\n"
)


def test_perf_analyzer_input_data_and_csv_round_trip(tmp_path):
    """The --input-data entries decode (as Triton deserializes BYTES) to exactly the requests'
    PNGs and text, with their seed, steps and budget; a perf_analyzer CSV row (one written by
    perf_analyzer 2.60 here) reads as seconds."""
    import base64

    import numpy as np
    from tritonclient.utils import deserialize_bytes_tensor

    from benchmarks.perf_analyzer_compare import input_data, parse_csv
    from benchmarks.serving import user_request

    requests = [user_request(32, i, returning=i == 0) for i in range(2)]
    data = input_data(requests, steps=3, timeout_ms=9000)["data"]
    assert len(data) == 2

    def decoded(entry: dict, name: str) -> list[bytes]:
        return list(deserialize_bytes_tensor(base64.b64decode(entry[name]["content"]["b64"])))

    for entry, r in zip(data, requests, strict=True):
        assert decoded(entry, "history_images") == r["history"]
        assert entry["history_images"]["shape"] == [len(r["history"])]
        assert decoded(entry, "reference_image") == [r["reference"]]
        assert decoded(entry, "text") == [r["text"].encode()]
        assert {k: entry[k]["content"] for k in ("seed", "steps", "timeout_ms")} == {
            "seed": [r["seed"]],
            "steps": [3],
            "timeout_ms": [9000],
        }
    csv = tmp_path / "c1.csv"
    csv.write_text(PERF_ANALYZER_ROW)
    row = parse_csv(csv)
    assert row["throughput_rps"] == 23.0915
    assert row["latency_s"]["p50"] == pytest.approx(0.042722)
    assert row["latency_s"]["p99"] == pytest.approx(0.055309)
    assert row["breakdown_s"]["server_compute"] == pytest.approx(0.040127)
    assert np.isclose(sum(row["breakdown_s"].values()), (9 + 711 + 3 + 40127 + 4) * 1e-6)


def test_perf_analyzer_and_the_harness_measure_the_same_server(tmp_path):
    """benchmarks.perf_analyzer_compare end to end on the tiny preset: perf_analyzer's requests
    (from the written --input-data) are all served by the ensemble, at least three windows of them,
    and both tools' numbers land in one record."""
    from benchmarks.perf_analyzer_compare import perf_analyzer_binary

    perf_analyzer_binary()  # installed by `make venv`; a clear error otherwise
    out = tmp_path / "pa.jsonl"
    run(
        "benchmarks.perf_analyzer_compare",
        "--preset", "tiny",
        "--requests", "4",
        "--concurrency", "1", "2",
        # a window is 4 requests on a shared 2-core machine: stability is not what this tests
        "--stability", "10.0",
        "--max-trials", "6",
        "--workdir", str(tmp_path / "w"),
        "--out", str(out),
    )  # fmt: skip
    record = json.loads(out.read_text().splitlines()[-1])
    assert set(record["levels"]) == {"c1", "c2"}
    for level in record["levels"].values():
        assert level["perf_analyzer"]["failed"] == 0
        assert level["perf_analyzer"]["served"] >= 3 * 4  # three windows of --requests
        assert level["harness"]["completed"] == 4 and not level["harness"]["errors"]
        assert all(v > 0 for v in level["ratios"].values())
