"""Served latency and throughput against the real tritonserver, side by side with the in-process pipeline.

    python -m benchmarks.serving --preset small [--concurrency 1 2 4 8 16] [--requests 16]
    python -m benchmarks.serving --preset tiny --quick          # CI smoke: runs everything, times nothing

In one run, on one machine: the in-process ONNX Runtime pipeline (the baseline), then the `pigeon`
ensemble over gRPC and HTTP at each concurrency (p50/p90/p95/p99 latency, throughput, queue vs compute
time per model from Triton's statistics), a returning user (same history: response cache) vs new users,
the UNet's dynamic batching on vs off, the FLOPs floor and the machine's measured peak. Every level warms
up first, is bounded in requests and seconds, and sends traffic to 127.0.0.1 only. Results: JSON lines in
benchmarks/results/serving.jsonl, plots in benchmarks/results/*.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    append_jsonl,
    environment,
    percentiles,
    prepare,
    run_threads,
    timestamp,
)

RESULTS = Path("benchmarks/results")


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def user_request(size: int, seed: int, returning: bool) -> dict:
    """A procedural user; new users get a history of their own (no cache hit possible)."""
    from pigeon.data.procedural import render, sample_user

    user = sample_user(np.random.default_rng(0 if returning else 1000 + seed))
    return {
        "history": [png(render(c, s, size)) for c, s in user.history],
        "reference": png(render(*user.reference, size)),
        "text": user.text,
        "seed": seed,
    }


def build_repository(checkpoint: Path, artifacts: Path, root: Path, variant: str, serving) -> Path:
    """The cpu repository for one server variant (SERVER_VARIANTS), version 1 published once."""
    from pigeon.checkpoint import load_config
    from pigeon.serving.repository import publish_version, write_configs

    repo = root / f"cpu-{variant}"
    built = repo / "unet" / "1" / "manifest.json"
    source = json.loads((artifacts / "manifest.json").read_text())
    components = set(source["components"])
    if (
        not (repo / "pigeon" / "1").exists()
        or not all((repo / c / "1").exists() for c in components)
        or json.loads(built.read_text()).get("checkpoint_sha256") != source["checkpoint_sha256"]
    ):  # none yet, or published from older artifacts
        shutil.rmtree(repo, ignore_errors=True)
        publish_version(repo, checkpoint, artifacts, 1)
    write_configs(repo, load_config(checkpoint), SERVER_VARIANTS[variant](serving), "cpu")
    return repo


# server variants, each a change to the given ServingConfig. The first is that config unchanged (the
# deployment default: on the cpu target the denoise loop runs the UNet in process) and gets the full
# sweep; the others call the UNet model over BLS, with and without its dynamic batcher.
SERVER_VARIANTS = {
    "default": lambda s: s,
    "unet-batched": lambda s: dataclasses.replace(
        s, unet_in_process=False, unet_dynamic_batching=True
    ),
    "unet-unbatched": lambda s: dataclasses.replace(
        s, unet_in_process=False, unet_dynamic_batching=False
    ),
}
FULL_SWEEP = next(iter(SERVER_VARIANTS))


def stats_snapshot(client) -> dict[str, dict[str, float]]:
    out = {}
    for m in client.statistics()["model_stats"]:
        s = m["inference_stats"]
        out[m["name"]] = {
            "count": float(s.get("success", {}).get("count", 0)),
            "queue_ns": float(s.get("queue", {}).get("ns", 0)),
            "compute_ns": float(s.get("compute_infer", {}).get("ns", 0)),
            "cache_hits": float(s.get("cache_hit", {}).get("count", 0)),
            "executions": float(m.get("execution_count", 0)),
            "inferences": float(m.get("inference_count", 0)),
        }
    return out


def stats_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    return {m: {k: after[m][k] - before.get(m, {}).get(k, 0.0) for k in after[m]} for m in after}


def run_level(
    url: str, protocol: str, concurrency: int, requests: list[dict], steps: int, max_seconds: float
) -> dict:
    """`concurrency` client threads share the requests; bounded by count and time."""
    from pigeon.serving.client import PigeonClient

    latencies, errors, lock = [], [], threading.Lock()
    queue = list(requests)
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        with PigeonClient(url, protocol, timeout_s=max_seconds) as client:
            while time.monotonic() < deadline:
                with lock:
                    if not queue:
                        return
                    r = queue.pop()
                try:
                    result = client.generate(
                        r["history"], r["reference"], r["text"], seed=r["seed"], steps=steps
                    )
                    with lock:
                        latencies.append(result.latency_s)
                except Exception as exc:  # counted and reported, never hidden
                    with lock:
                        errors.append(str(exc)[:200])

    wall = run_threads([worker] * concurrency)
    return {
        "latency_s": percentiles(latencies) if latencies else None,
        "completed": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / wall,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=16, help="per concurrency level")
    parser.add_argument("--protocols", nargs="+", default=["grpc", "http"])
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="per level")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 request per level")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--results", default=str(RESULTS), help="folder for JSON lines and plots")
    parser.add_argument(
        "--serving", default=None, help="serving.json (ServingConfig) to serve with"
    )
    parser.add_argument(
        "--skip-variants",
        nargs="+",
        choices=[v for v in SERVER_VARIANTS if v != FULL_SWEEP],
        help="server variants not to run (default: all of them)",
    )
    args = parser.parse_args()
    results = Path(args.results)
    if args.quick:
        args.concurrency, args.requests, args.protocols = [1, 2], 2, ["grpc", "http"]

    from pigeon.checkpoint import load_checkpoint
    from pigeon.config import ServingConfig, load_json
    from pigeon.core.images import load_image
    from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
    from pigeon.inference.runners import OrtRunner
    from pigeon.serving.client import PigeonClient
    from pigeon.serving.server import TritonServer

    workdir = Path(args.workdir or f"runs/bench-{args.preset}")
    checkpoint, artifacts = prepare(args.preset, workdir)
    ckpt = load_checkpoint(checkpoint)
    size = ckpt.config.image_size
    steps = args.steps or ckpt.config.scheduler.num_inference_steps
    env = environment()
    record = {
        "benchmark": "serving",
        "time": timestamp(),
        "env": env,
        "preset": args.preset,
        "steps": steps,
        "quick": args.quick,
    }
    serving = load_json(ServingConfig, args.serving) if args.serving else ServingConfig()
    record["serving"] = dataclasses.asdict(serving)

    # 1. the in-process ONNX Runtime pipeline on the very requests of a served level (same users and
    #    seeds: the seed decides how many tokens the personalizer generates before </img>)
    pipe = PigeonPipeline(
        ckpt.config, ckpt.tokenizer, OrtRunner.from_artifacts(artifacts, ckpt.config)
    )
    same = [
        GenerationRequest(
            history=[load_image(h) for h in r["history"]],
            reference=load_image(r["reference"]),
            text=r["text"],
            seed=r["seed"],
            steps=steps,
        )
        for r in (user_request(size, i, returning=True) for i in range(args.requests))
    ]
    request = same[0]
    pipe(request)
    runs = [pipe(r)[0] for r in same]
    record["in_process_s"] = percentiles([r.timings["total"] for r in runs])
    record["in_process_stage_s"] = {
        k: float(np.median([r.timings[k] for r in runs])) for k in runs[0].timings
    }

    # 2. the floor
    from benchmarks.floor import machine_peak_flops, request_flops

    flops = request_flops(checkpoint, request)
    record["flops_per_request"] = flops
    record["machine_peak_flops"] = machine_peak_flops()
    floor_s = sum(flops.values()) / record["machine_peak_flops"]

    # 3. served: dynamic batching on (every protocol and level), then the other server variants
    #    (gRPC at the lowest and highest concurrency)
    levels = {}
    variants = [v for v in SERVER_VARIANTS if v not in (args.skip_variants or [])]
    for variant in variants:
        full = variant == FULL_SWEEP
        repo = build_repository(checkpoint, artifacts, workdir / "repo", variant, serving)
        with TritonServer(repo) as server, PigeonClient(server.grpc_url, "grpc") as stats_client:
            warm = [user_request(size, i, True) for i in range(2)]
            run_level(server.grpc_url, "grpc", 1, warm, steps, args.max_seconds)
            protocols = args.protocols if full else ["grpc"]
            concurrencies = (
                args.concurrency if full else sorted({min(args.concurrency), max(args.concurrency)})
            )
            for protocol in protocols:
                url = server.grpc_url if protocol == "grpc" else server.http_url
                for c in concurrencies:
                    reqs = [user_request(size, i, returning=True) for i in range(args.requests)]
                    before = stats_snapshot(stats_client)
                    level = run_level(url, protocol, c, reqs, steps, args.max_seconds)
                    level["models"] = stats_delta(before, stats_snapshot(stats_client))
                    levels[f"{variant}/{protocol}/c{c}"] = level
                    lat = level["latency_s"]
                    print(
                        f"{variant:<15} {protocol:<4} c={c:<3}"
                        f" p50 {lat['p50'] * 1e3 if lat else float('nan'):8.1f} ms  "
                        f"{level['throughput_rps']:6.2f} req/s  errors {len(level['errors'])}",
                        flush=True,
                    )
            if full:  # 4. returning users (cache hits) vs new users, sequential
                for kind, returning in (("new", False), ("returning", True)):
                    reqs = [
                        user_request(size, 100 + i, returning)
                        for i in range(2 if args.quick else 8)
                    ]
                    before = stats_snapshot(stats_client)
                    level = run_level(server.grpc_url, "grpc", 1, reqs, steps, args.max_seconds)
                    level["models"] = stats_delta(before, stats_snapshot(stats_client))
                    levels[f"cache/{kind}"] = level
    record["levels"] = levels
    append_jsonl(results / "serving.jsonl", record)
    report(record, floor_s, args.quick, results)


def report(record: dict, floor_s: float, quick: bool, results: Path) -> None:
    levels = record["levels"]
    base = record["in_process_s"]["p50"]
    c1 = levels.get(f"{FULL_SWEEP}/grpc/c1", {}).get("latency_s") or {}
    print(
        f"\nin-process ONNX Runtime p50 {base * 1e3:.1f} ms; floor {floor_s * 1e3:.1f} ms "
        f"({sum(record['flops_per_request'].values()) / 1e9:.1f} GFLOP at "
        f"{record['machine_peak_flops'] / 1e9:.0f} GFLOP/s)"
    )
    if c1:
        print(
            f"Triton gRPC c=1 p50 {c1['p50'] * 1e3:.1f} ms ({c1['p50'] / base - 1:+.1%} vs in "
            f"process); efficiency {floor_s / c1['p50']:.0%} of peak"
        )
    for variant in SERVER_VARIANTS:
        points = sorted(
            (int(k.split("/c")[1]), v)
            for k, v in levels.items()
            if k.startswith(f"{variant}/grpc/") and v["latency_s"]
        )
        for c, v in points:
            print(
                f"{variant:<15} gRPC c={c:<3} p50 {v['latency_s']['p50'] * 1e3:8.1f} ms "
                f"({v['latency_s']['p50'] / base - 1:+.1%} vs in process), "
                f"{v['throughput_rps']:.2f} req/s"
            )
    rates = {
        int(k.split("/c")[1]): v["throughput_rps"]
        for k, v in levels.items()
        if k.startswith(f"{FULL_SWEEP}/grpc/")
    }
    if 1 in rates and 8 in rates:
        print(f"throughput c=8 / c=1: {rates[8] / rates[1]:.2f}x")
    for kind in ("new", "returning"):
        level = levels.get(f"cache/{kind}")
        if level:
            enc = level["models"].get("history_encoder", {})
            per = enc.get("compute_ns", 0) / max(1.0, level["completed"]) / 1e6
            print(
                f"{kind:<9} user: p50 {level['latency_s']['p50'] * 1e3:.1f} ms, history_encoder "
                f"compute {per:.2f} ms/request, cache hits {enc.get('cache_hits', 0):.0f}"
            )
    unet = {k: v["models"].get("unet", {}) for k, v in levels.items() if "/c" in k}
    for k, u in unet.items():
        if u.get("executions"):
            print(
                f"{k:<22} unet batch size {u['inferences'] / u['executions']:.2f}, "
                f"queue {u['queue_ns'] / max(1, u['count']) / 1e6:.2f} ms/request"
            )
    if not quick:
        plot(record, results)


def plot(record: dict, results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for protocol in ("grpc", "http"):
        points = sorted(
            (int(k.split("/c")[1]), v["latency_s"]["p50"] * 1e3, v["throughput_rps"])
            for k, v in record["levels"].items()
            if k.startswith(f"{FULL_SWEEP}/{protocol}/") and v["latency_s"]
        )
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=protocol)
    ax.axhline(record["in_process_s"]["p50"] * 1e3, color="gray", ls="--", label="in process")
    ax.set(
        xscale="log",
        xlabel="concurrency",
        ylabel="p50 latency (ms)",
        title=f"Pigeon on Triton, {record['preset']} preset, {record['steps']} steps",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / "serving_latency.png", dpi=120)
    stages = {k: v for k, v in record["in_process_stage_s"].items() if k != "total"}
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(stages), [v * 1e3 for v in stages.values()])
    ax.set(xlabel="ms (p50, in-process ONNX Runtime)", title="Where the time goes")
    fig.tight_layout()
    fig.savefig(results / "stage_shares.png", dpi=120)


if __name__ == "__main__":
    main()
