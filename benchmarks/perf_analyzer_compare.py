"""A second opinion on the served numbers: NVIDIA's `perf_analyzer` and the project's own harness
against the same `pigeon` ensemble, the same requests, in one run on one server.

    make perf-analyzer                  # installs the binary (benchmarks/install_perf_analyzer.sh)
    python -m benchmarks.perf_analyzer_compare --checkpoint checkpoints/small --concurrency 1 8 \\
        --requests 32 --out benchmarks/results/perf_analyzer.jsonl

For each concurrency level, one after the other on one server (`default` serving variant, gRPC):
1. the project's harness (`benchmarks.serving.run_level`): `--requests` requests over that many
   client threads, latency as each client measures `generate()`;
2. perf_analyzer with `--input-data` from the very same requests (written by `input_data`, base64
   PNGs, the same seeds, steps and time budget), counting windows of `--requests` requests until
   three windows agree within `--stability` (10%; its own rule; at most `--max-trials` windows).
Both report p50 / p99 and throughput; the record keeps each and their ratio. Where they differ by
more than 10%, the difference is theirs to explain (docs: benchmarks/README.md, "A second opinion").
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

AGREEMENT = 0.10  # the issue's tolerance between the two tools' numbers
INSTALL_HINT = "run `make perf-analyzer` (benchmarks/install_perf_analyzer.sh)"


def perf_analyzer_binary() -> Path:
    """$PERF_ANALYZER, else the venv's wrapper, else `perf_analyzer` on PATH."""
    import sys

    for candidate in (
        os.environ.get("PERF_ANALYZER"),
        str(Path(sys.executable).parent / "perf_analyzer"),
        shutil.which("perf_analyzer"),
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(f"perf_analyzer is not installed: {INSTALL_HINT}")


def input_data(requests: list[dict], steps: int, timeout_ms: int) -> dict:
    """perf_analyzer's `--input-data` JSON for these requests (benchmarks.serving.user_request
    dicts), one entry per request in order. A BYTES tensor given as {"b64": ...} is its serialized
    form: each element as a 4-byte little-endian length and its bytes, as Triton sends them."""
    from tritonclient.utils import serialize_byte_tensor

    from pigeon.interface import PARAMETERS

    def b64(items: list[bytes]) -> dict:
        import numpy as np

        serialized = serialize_byte_tensor(np.array(items, dtype=np.object_))
        return {
            "content": {"b64": base64.b64encode(serialized.item()).decode()},
            "shape": [len(items)],
        }

    by_name = {p.name: p for p in PARAMETERS}
    entries = []
    for r in requests:
        entry = {
            "history_images": b64(r["history"]),
            "reference_image": b64([r["reference"]]),
            "text": b64([r["text"].encode("utf-8")]),
        }
        for name, value in (("seed", r["seed"]), ("steps", steps), ("timeout_ms", timeout_ms)):
            if by_name[name].dtype != "int64":  # perf_analyzer reads a JSON number as the dtype
                raise ValueError(f"{name} is served as {by_name[name].dtype}, not an integer")
            entry[name] = {"content": [value], "shape": [1]}
        entries.append(entry)
    return {"data": entries}


def parse_csv(path: Path) -> dict:
    """perf_analyzer's `-f` CSV row (one concurrency level) -> seconds and requests per second."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != 1:
        raise ValueError(f"{path}: expected one concurrency row, found {len(rows)}")
    row = rows[0]
    us = 1e-6
    return {
        "throughput_rps": float(row["Inferences/Second"]),
        "latency_s": {
            "p50": float(row["p50 latency"]) * us,
            "p90": float(row["p90 latency"]) * us,
            "p95": float(row["p95 latency"]) * us,
            "p99": float(row["p99 latency"]) * us,
        },
        # its mean breakdown of a request (the ensemble's own statistics, composing models summed)
        "breakdown_s": {
            key: float(row[column]) * us
            for key, column in (
                ("client_send", "Client Send"),
                ("network_and_server", "Network+Server Send/Recv"),
                ("server_queue", "Server Queue"),
                ("server_compute", "Server Compute Infer"),
                ("client_recv", "Client Recv"),
            )
        },
    }


def run_perf_analyzer(
    binary: Path,
    grpc_url: str,
    data_file: Path,
    concurrency: int,
    window_requests: int,
    max_trials: int,
    out_csv: Path,
    timeout_s: float,
    stability: float = AGREEMENT,
) -> dict:
    command = [
        str(binary),
        "-m", "pigeon",
        "-u", grpc_url,
        "-i", "grpc",
        "--input-data", str(data_file),
        "--concurrency-range", str(concurrency),
        "--measurement-mode", "count_windows",
        "--measurement-request-count", str(window_requests),
        "--stability-percentage", str(round(stability * 100)),
        "--max-trials", str(max_trials),
        "--percentile", "99",
        "-f", str(out_csv),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not out_csv.is_file():
        raise RuntimeError(
            f"perf_analyzer exited {done.returncode}: {(done.stderr or done.stdout)[-800:]}"
        )
    return {**parse_csv(out_csv), "command": command[:1] + ["..."] + command[3:]}


def compare(ours: dict, theirs: dict) -> dict:
    """theirs / ours for p50, p99 and throughput, and whether each is within AGREEMENT."""
    ratios = {
        "p50": theirs["latency_s"]["p50"] / ours["latency_s"]["p50"],
        "p99": theirs["latency_s"]["p99"] / ours["latency_s"]["p99"],
        "throughput": theirs["throughput_rps"] / ours["throughput_rps"],
    }
    return {
        "ratios": ratios,
        "within": {k: abs(v - 1) <= AGREEMENT for k, v in ratios.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None, help="default: random weights of --preset")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=32, help="per level and per window")
    parser.add_argument("--steps", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--max-trials", type=int, default=6, help="perf_analyzer's windows")
    parser.add_argument(
        "--stability",
        type=float,
        default=AGREEMENT,
        help="perf_analyzer's window agreement (share) before it reports",
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="benchmarks/results/perf_analyzer.jsonl")
    args = parser.parse_args(argv)
    if args.requests < 2 or min(args.concurrency) < 1 or args.max_trials < 3:
        parser.error("--requests >= 2, --concurrency >= 1, --max-trials >= 3")

    from benchmarks.common import (
        append_jsonl,
        checkpoint_and_artifacts,
        ensemble_counts,
        environment,
        timestamp,
    )
    from benchmarks.serving import build_repository, run_level, user_request
    from pigeon.checkpoint import load_config
    from pigeon.config import ServingConfig
    from pigeon.serving.server import TritonServer

    binary = perf_analyzer_binary()
    name = Path(args.checkpoint).name if args.checkpoint else args.preset
    workdir = Path(args.workdir or f"runs/perf-analyzer-{name}")
    checkpoint, artifacts = checkpoint_and_artifacts(args.checkpoint, args.preset, workdir)
    config = load_config(checkpoint)
    steps = args.steps or config.scheduler.num_inference_steps
    serving = ServingConfig()
    repo = build_repository(checkpoint, artifacts, workdir / "repo", "default", serving)
    timeout_s = 300.0
    requests = [user_request(config.image_size, i, returning=True) for i in range(args.requests)]
    data_file = workdir / "input_data.json"
    data_file.write_text(json.dumps(input_data(requests, steps, int(timeout_s * 1000))))
    record = {
        "benchmark": "perf_analyzer",
        "time": timestamp(),
        "env": environment(),
        "checkpoint": str(checkpoint),
        "steps": steps,
        "requests": args.requests,
        "stability": args.stability,
        "serving": dataclasses.asdict(serving),
        "levels": {},
    }
    with TritonServer(repo, log_file=workdir / "tritonserver.log") as server:
        run_level(server.grpc_url, "grpc", 1, requests[:2], steps, timeout_s)  # warm-up
        for c in args.concurrency:
            ours = run_level(server.grpc_url, "grpc", c, list(requests), steps, timeout_s)
            if ours["errors"] or not ours["completed"]:
                raise RuntimeError(f"the harness failed at concurrency {c}: {ours['errors'][:3]}")
            served_before, failed_before = ensemble_counts(server.grpc_url)
            theirs = run_perf_analyzer(
                binary,
                server.grpc_url,
                data_file,
                c,
                args.requests,
                args.max_trials,
                workdir / f"perf_analyzer_c{c}.csv",
                timeout_s * args.max_trials,
                args.stability,
            )
            served, failed = ensemble_counts(server.grpc_url)
            theirs["served"], theirs["failed"] = served - served_before, failed - failed_before
            if theirs["failed"] or not theirs["served"]:  # its data did not make valid requests
                raise RuntimeError(f"perf_analyzer's requests at concurrency {c}: {theirs}")
            level = {"harness": ours, "perf_analyzer": theirs, **compare(ours, theirs)}
            record["levels"][f"c{c}"] = level
            r = level["ratios"]
            print(
                f"c={c}: harness p50 {ours['latency_s']['p50'] * 1e3:.0f} ms, p99 "
                f"{ours['latency_s']['p99'] * 1e3:.0f} ms, {ours['throughput_rps']:.2f} req/s | "
                f"perf_analyzer p50 {theirs['latency_s']['p50'] * 1e3:.0f} ms, p99 "
                f"{theirs['latency_s']['p99'] * 1e3:.0f} ms, {theirs['throughput_rps']:.2f} req/s"
                f" | ratios p50 {r['p50']:.2f} p99 {r['p99']:.2f} throughput "
                f"{r['throughput']:.2f}",
                flush=True,
            )
    append_jsonl(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
