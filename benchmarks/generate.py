"""`pigeon generate` end to end, as a user runs it: cold CLI wall time, peak memory, warm stage times.

    python -m benchmarks.generate --preset tiny [--runs 5] [--out benchmarks/results/generate.jsonl]

Cold: the whole CLI process (imports, checkpoint load with hash checks, one generation), timed from
outside, its peak RSS read from the child's rusage. Warm: the in-process pipeline after a warm-up, per
stage. Reports medians and percentiles, never one mean; appends one JSON line per run of this script.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import append_jsonl, environment, percentiles


def cold_runs(checkpoint: Path, data: Path, runs: int) -> tuple[list[float], list[float]]:
    user = data / "user0"
    cmd = [
        sys.executable,
        "-m",
        "pigeon.cli",
        "generate",
        "--checkpoint",
        str(checkpoint),
        "--history",
        *sorted(str(p) for p in user.glob("history_*.png")),
        "--reference",
        str(user / "reference.png"),
        "--text",
        (user / "text.txt").read_text().strip(),
        "--out",
        str(data / "out.png"),
    ]
    walls, rss = [], []
    for _ in range(runs):
        start = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        if res.returncode:
            raise SystemExit(f"pigeon generate failed: {res.stderr}")
        rss.append(json.loads(res.stdout)["peak_rss_mib"])
    return walls, rss


def warm_runs(checkpoint: Path, data: Path, runs: int) -> dict[str, dict[str, float]]:
    from pigeon.core.images import load_image
    from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline

    user = data / "user0"
    pipe = PigeonPipeline.from_checkpoint(checkpoint)
    request = GenerationRequest(
        history=[load_image(p) for p in sorted(user.glob("history_*.png"))],
        reference=load_image(user / "reference.png"),
        text=(user / "text.txt").read_text().strip(),
    )
    pipe(request)  # warm-up
    stages: dict[str, list[float]] = {}
    for _ in range(runs):
        for stage, seconds in pipe(request)[0].timings.items():
            stages.setdefault(stage, []).append(seconds)
    return {stage: percentiles(v) for stage, v in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/generate.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = {"tiny": 32, "small": 64}.get(args.preset, 256)
        for cmd in (
            ["init", "--preset", args.preset, "--out", str(tmp / "ckpt")],
            ["data", "procedural", "--out", str(tmp / "data"), "--users", "1", "--size", str(size)],
        ):
            subprocess.run(
                [sys.executable, "-m", "pigeon.cli", *cmd], check=True, capture_output=True
            )
        walls, rss = cold_runs(tmp / "ckpt", tmp / "data", args.runs)
        warm = warm_runs(tmp / "ckpt", tmp / "data", args.runs * 4)
    result = {
        "benchmark": "generate",
        "preset": args.preset,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "env": environment(),
        "cli_wall_s": percentiles(walls),
        "cli_peak_rss_mib": max(rss),
        "warm_stage_s": warm,
        "bench_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    append_jsonl(args.out, result)
    print(
        f"pigeon generate, preset {args.preset}, {args.runs} cold CLI runs, "
        f"{args.runs * 4} warm runs ({result['env']['cores']} cores)"
    )
    print(
        f"  CLI wall: p50 {result['cli_wall_s']['p50']:.2f} s, p90 "
        f"{result['cli_wall_s']['p90']:.2f} s; peak RSS {result['cli_peak_rss_mib']:.0f} MiB"
    )
    print(f"  {'stage':<16}{'p50 ms':>10}{'p90 ms':>10}")
    for stage, p in warm.items():
        print(f"  {stage:<16}{p['p50'] * 1e3:>10.1f}{p['p90'] * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
