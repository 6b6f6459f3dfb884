"""Cold start: the first requests after a server start, with and without `pigeon serve`'s warm-up
(`TritonServer.warm_up`: one synthetic request through the ensemble before the endpoints are
announced). Real tritonserver (`cpu` target), traffic to 127.0.0.1 only.

    python -m benchmarks.cold_start --checkpoint checkpoints/small --requests 8

In one run, on one machine, twice (a fresh server each time, the same requests): `--requests`
new users one after another over gRPC; reports the first request's latency, the median of the rest,
and their ratio. Results: JSON lines in benchmarks/results/cold_start.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def first_requests(server, requests: list) -> list[float]:
    """Seconds of each request, sent one after another on one connection."""
    from benchmarks.load import _send
    from pigeon.serving.client import PigeonClient

    seconds = []
    with PigeonClient(server.grpc_url, "grpc", timeout_s=300) as client:
        for request in requests:
            start = time.perf_counter()
            _send(client, request)
            seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None, help="default: random weights of --preset")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=8, help="per server, one after another")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="benchmarks/results/cold_start.jsonl")
    args = parser.parse_args(argv)
    if args.requests < 3:
        parser.error(f"--requests={args.requests}: the first and at least two more")

    from benchmarks.common import append_jsonl, checkpoint_and_artifacts, environment, timestamp
    from benchmarks.load import new_user_requests
    from benchmarks.serving import build_repository
    from pigeon.checkpoint import load_config
    from pigeon.config import ServingConfig
    from pigeon.serving.server import TritonServer

    name = Path(args.checkpoint).name if args.checkpoint else args.preset
    workdir = Path(args.workdir or f"runs/cold-start-{name}")
    checkpoint, artifacts = checkpoint_and_artifacts(args.checkpoint, args.preset, workdir)
    repo = build_repository(checkpoint, artifacts, workdir / "repo", "default", ServingConfig())
    config = load_config(checkpoint)
    requests = new_user_requests(
        args.requests, config.image_size, config.personalizer.max_history, seed=11
    )
    record = {"benchmark": "cold_start", "time": timestamp(), "env": environment()}
    record.update(checkpoint=str(checkpoint), requests=args.requests)
    for mode in ("no warm-up", "warm-up"):
        with TritonServer(repo, log_file=workdir / "tritonserver.log") as server:
            warm_up_s = server.warm_up() if mode == "warm-up" else None
            seconds = first_requests(server, requests)
        rest = statistics.median(seconds[1:])
        record[mode] = {
            "warm_up_s": warm_up_s,
            "seconds": seconds,
            "first_s": seconds[0],
            "median_rest_s": rest,
            "first_over_rest": seconds[0] / rest,
        }
        print(
            f"{mode:>10}: first {seconds[0] * 1e3:.0f} ms, median of the next "
            f"{len(seconds) - 1} {rest * 1e3:.0f} ms ({seconds[0] / rest:.2f}x)"
            + (f"; warm-up took {warm_up_s:.2f} s" if warm_up_s else ""),
            flush=True,
        )
    append_jsonl(args.out, record)
    print(
        json.dumps({m: round(record[m]["first_over_rest"], 2) for m in ("no warm-up", "warm-up")})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
