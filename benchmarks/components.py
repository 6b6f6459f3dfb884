"""Each component on each backend at its declared opt shape, side by side in one run.

    python -m benchmarks.components --preset small [--runs 30] [--workdir runs/bench-small]

Backends: PyTorch eager (the export wrappers), with `--compile` also torch.compile (inductor) where it
compiles (a failure is recorded with its reason, not hidden), and ONNX Runtime (the exported files),
fp32, on this machine's CPU. Warm-up first (it includes compilation); medians and percentiles; one JSON
line per component and backend.
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
    parser.add_argument("--compile", action="store_true", help="add torch.compile (slow to build)")
    args = parser.parse_args()

    from pigeon.checkpoint import load_checkpoint
    from pigeon.inference.runners import OrtRunner, TorchRunner
    from pigeon.specs import component_specs, sample_inputs

    checkpoint, artifacts = prepare(args.preset, args.workdir or f"runs/bench-{args.preset}")
    ckpt = load_checkpoint(checkpoint)
    runners = {"pytorch": TorchRunner(ckpt.model)}
    if args.compile:
        runners["torch.compile"] = TorchRunner(
            ckpt.model, compile={n: "default" for n in component_specs(ckpt.config)}
        )
    runners["onnxruntime"] = OrtRunner.from_artifacts(artifacts, ckpt.config)
    env = environment()
    print(
        f"components, preset {args.preset}, opt shapes, {args.runs} runs after {args.warmup} "
        f"warm-up ({env['cores']} cores)"
    )
    compile_col = f"{'compile p50 ms':>16}" if args.compile else ""
    print(
        f"{'component':<18}{'eager p50 ms':>14}{compile_col}{'ort p50 ms':>12}{'speed-up':>10}"
        "  shapes"
    )
    for name, spec in component_specs(ckpt.config).items():
        feeds = sample_inputs(spec, ckpt.config, "opt")
        row = {}
        for backend, runner in runners.items():
            record = {
                "benchmark": "components",
                "time": timestamp(),
                "env": env,
                "preset": args.preset,
                "component": name,
                "backend": backend,
            }
            try:
                stats = measure(
                    lambda r=runner, n=name, f=feeds: r.run(n, f), args.warmup, args.runs
                )
            except Exception as exc:  # torch.compile: "where it works"; the reason is kept
                row[backend] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                append_jsonl(args.out, {**record, "error": row[backend]["error"]})
                continue
            row[backend] = stats
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            append_jsonl(
                args.out, {**record, "precision": "fp32", "shapes": shapes, "seconds": stats}
            )
        eager, ort = row["pytorch"]["p50"], row["onnxruntime"]["p50"]
        shapes = " ".join(f"{k}{list(v.shape)}" for k, v in list(feeds.items())[:2])
        compiled_cell = ""
        if args.compile:
            c = row["torch.compile"]
            compiled_cell = f"{'failed':>16}" if "error" in c else f"{c['p50'] * 1e3:>16.2f}"
        print(
            f"{name:<18}{eager * 1e3:>14.2f}{compiled_cell}{ort * 1e3:>12.2f}"
            f"{eager / ort:>9.2f}x  {shapes}"
        )


if __name__ == "__main__":
    main()
