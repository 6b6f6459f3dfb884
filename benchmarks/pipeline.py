"""End-to-end generation in process, PyTorch eager vs ONNX Runtime, with a per-stage breakdown.

    python -m benchmarks.pipeline --preset small [--runs 10] [--steps 25]

Same request, same seed, both backends in one run on the same machine. Warm-up first; medians and
percentiles per stage; one JSON line per backend.
"""

from __future__ import annotations

import argparse

from benchmarks.common import (
    append_jsonl,
    environment,
    percentiles,
    prepare,
    procedural_request,
    timestamp,
    workdir_for,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="benchmarks/results/pipeline.jsonl")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also sweep history length and sampler/steps (ONNX Runtime)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override, e.g. personalizer.max_history=20 (with "
        "personalizer.max_positions=4096) for the long-history sweep",
    )
    args = parser.parse_args()

    from pigeon.checkpoint import load_checkpoint
    from pigeon.inference.pipeline import PigeonPipeline
    from pigeon.inference.runners import OrtRunner, TorchRunner

    workdir = args.workdir or workdir_for(args.preset, args.set)
    checkpoint, artifacts = prepare(args.preset, workdir, overrides=args.set)
    ckpt = load_checkpoint(checkpoint)
    request = procedural_request(ckpt.config.image_size, args.steps)
    pipes = {
        "pytorch": PigeonPipeline(ckpt.config, ckpt.tokenizer, TorchRunner(ckpt.model)),
        "onnxruntime": PigeonPipeline(
            ckpt.config, ckpt.tokenizer, OrtRunner.from_artifacts(artifacts, ckpt.config)
        ),
    }
    env = environment()
    stages: dict[str, dict[str, dict]] = {}
    for backend, pipe in pipes.items():
        for _ in range(args.warmup):
            pipe(request)
        times: dict[str, list[float]] = {}
        for _ in range(args.runs):
            for stage, seconds in pipe(request)[0].timings.items():
                times.setdefault(stage, []).append(seconds)
        stages[backend] = {s: percentiles(v) for s, v in times.items()}
        append_jsonl(
            args.out,
            {
                "benchmark": "pipeline",
                "time": timestamp(),
                "env": env,
                "preset": args.preset,
                "backend": backend,
                "precision": "fp32",
                "steps": args.steps or ckpt.config.scheduler.num_inference_steps,
                "stage_seconds": stages[backend],
            },
        )
    steps = args.steps or ckpt.config.scheduler.num_inference_steps
    print(
        f"pipeline, preset {args.preset}, {steps} steps, {args.runs} runs after {args.warmup} "
        f"warm-up ({env['cores']} cores)"
    )
    print(f"{'stage':<16}{'eager p50 ms':>14}{'ort p50 ms':>12}{'speed-up':>10}")
    for stage in stages["pytorch"]:
        eager, ort = stages["pytorch"][stage]["p50"], stages["onnxruntime"][stage]["p50"]
        print(f"{stage:<16}{eager * 1e3:>14.1f}{ort * 1e3:>12.1f}{eager / ort:>9.2f}x")
    if args.sweep:
        sweep(pipes["onnxruntime"], ckpt.config, args, env)


def sweep(pipe, config, args, env) -> None:
    """History length (up to the configured maximum) and sampler x steps, ONNX Runtime, p50."""
    import dataclasses
    import resource

    from pigeon.inference.pipeline import GenerationRequest

    base = procedural_request(config.image_size)
    rows = []
    max_history = config.personalizer.max_history
    lengths = sorted({n for n in (1, 5, 10, 20) if n <= max_history} | {max_history})
    for n in lengths:
        history = (base.history * n)[:n]
        rows.append(
            (f"history={n}", dataclasses.replace(base, history=history, steps=25, sampler="ddim"))
        )
    rows.append(("ddim 25 steps", dataclasses.replace(base, steps=25, sampler="ddim")))
    rows.append(("dpmpp_2m 10 steps", dataclasses.replace(base, steps=10, sampler="dpmpp_2m")))
    print(f"\nsweep (ONNX Runtime, {args.runs} runs each)")
    for name, request in rows:
        assert isinstance(request, GenerationRequest)
        pipe(request)
        totals = [pipe(request)[0].timings["total"] for _ in range(args.runs)]
        stats = percentiles(totals)
        append_jsonl(
            args.out,
            {
                "benchmark": "pipeline_sweep",
                "time": timestamp(),
                "env": env,
                "preset": args.preset,
                "overrides": args.set,
                "backend": "onnxruntime",
                "case": name,
                "seconds": stats,
            },
        )
        print(f"  {name:<20} p50 {stats['p50'] * 1e3:8.1f} ms  p90 {stats['p90'] * 1e3:8.1f} ms")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS of this process (both backends loaded): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
