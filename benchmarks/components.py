"""Each component on each backend at its declared opt shape, side by side in one run.

    python -m benchmarks.components --preset small [--runs 30] [--workdir runs/bench-small]

Backends: PyTorch eager (the export wrappers) and ONNX Runtime (the exported files), fp32, on this
machine's CPU. Warm-up first; medians and percentiles; one JSON line per component and backend.
"""

from __future__ import annotations

import argparse

from benchmarks.common import append_jsonl, environment, measure, prepare, timestamp


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="benchmarks/results/components.jsonl")
    args = parser.parse_args()

    from pigeon.checkpoint import load_checkpoint
    from pigeon.inference.runners import OrtRunner, TorchRunner
    from pigeon.specs import component_specs, sample_inputs

    checkpoint, artifacts = prepare(args.preset, args.workdir or f"runs/bench-{args.preset}")
    ckpt = load_checkpoint(checkpoint)
    runners = {
        "pytorch": TorchRunner(ckpt.model),
        "onnxruntime": OrtRunner.from_artifacts(artifacts, ckpt.config),
    }
    env = environment()
    print(
        f"components, preset {args.preset}, opt shapes, {args.runs} runs after {args.warmup} "
        f"warm-up ({env['cores']} cores)"
    )
    print(f"{'component':<18}{'eager p50 ms':>14}{'ort p50 ms':>12}{'speed-up':>10}  shapes")
    for name, spec in component_specs(ckpt.config).items():
        feeds = sample_inputs(spec, ckpt.config, "opt")
        row = {}
        for backend, runner in runners.items():
            stats = measure(lambda r=runner, n=name, f=feeds: r.run(n, f), args.warmup, args.runs)
            row[backend] = stats
            append_jsonl(
                args.out,
                {
                    "benchmark": "components",
                    "time": timestamp(),
                    "env": env,
                    "preset": args.preset,
                    "component": name,
                    "backend": backend,
                    "precision": "fp32",
                    "shapes": {k: list(v.shape) for k, v in feeds.items()},
                    "seconds": stats,
                },
            )
        eager, ort = row["pytorch"]["p50"], row["onnxruntime"]["p50"]
        shapes = " ".join(f"{k}{list(v.shape)}" for k, v in list(feeds.items())[:2])
        print(f"{name:<18}{eager * 1e3:>14.2f}{ort * 1e3:>12.2f}{eager / ort:>9.2f}x  {shapes}")


if __name__ == "__main__":
    main()
