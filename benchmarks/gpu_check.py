"""GPU check (one short run on a lent H100/H200): export, TensorRT where present, validate, time.

    bash benchmarks/gpu_check.sh            # wraps: python -m benchmarks.gpu_check --preset small

Exports and validates ONNX (CPU ONNX Runtime, as everywhere), builds and validates TensorRT engines if
`tensorrt` imports, then times every component at its opt shape with CUDA events: PyTorch eager fp32,
PyTorch eager under fp16 autocast, ONNX Runtime's CUDA provider when present, and TensorRT engines when
built. Prints the table last; appends JSON lines to benchmarks/results/gpu_check.jsonl.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import append_jsonl, environment, percentiles, prepare, timestamp


def cuda_time(fn, warmup: int, runs: int) -> dict[str, float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return percentiles(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from pigeon.checkpoint import load_checkpoint
    from pigeon.export.errors import ExportError
    from pigeon.models.export_wrappers import export_module
    from pigeon.specs import component_specs, sample_inputs

    start = time.perf_counter()
    checkpoint, artifacts = prepare(args.preset, args.workdir or f"runs/gpu-{args.preset}")
    print(
        f"[gpu_check] export + ONNX Runtime validation: {time.perf_counter() - start:.0f}s",
        flush=True,
    )
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.model.cuda().eval()
    trt_runner = None
    try:
        from pigeon.export.tensorrt import TrtRunner, export_tensorrt

        export_tensorrt(artifacts, precision="fp16")
        trt_runner = TrtRunner(
            {n: artifacts / "tensorrt" / n / "engine.plan" for n in component_specs(ckpt.config)},
            ckpt.config,
        )
        print("[gpu_check] TensorRT engines built and validated", flush=True)
    except ExportError as exc:
        print(f"[gpu_check] TensorRT skipped: {exc}", flush=True)
    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    rows = []
    for name, spec in component_specs(ckpt.config).items():
        feeds = sample_inputs(spec, ckpt.config, "opt")
        module = export_module(model, name)
        args_gpu = [torch.from_numpy(feeds[n]).cuda() for n in spec.input_names]
        results = {}
        with torch.inference_mode():
            results["eager_fp32"] = cuda_time(lambda m=module, a=args_gpu: m(*a), 3, args.runs)
            with torch.autocast("cuda", dtype=torch.float16):
                results["eager_fp16"] = cuda_time(lambda m=module, a=args_gpu: m(*a), 3, args.runs)
        if ort_cuda:
            sess = ort.InferenceSession(
                str(artifacts / name / "model.onnx"), providers=["CUDAExecutionProvider"]
            )
            results["ort_cuda"] = cuda_time(lambda s=sess, f=feeds: s.run(None, f), 3, args.runs)
        if trt_runner is not None:
            results["tensorrt_fp16"] = cuda_time(
                lambda n=name, f=feeds: trt_runner.run(n, f), 3, args.runs
            )
        append_jsonl(
            "benchmarks/results/gpu_check.jsonl",
            {
                "benchmark": "gpu_check",
                "time": timestamp(),
                "env": environment(),
                "gpu": torch.cuda.get_device_name(0),
                "preset": args.preset,
                "component": name,
                "shapes": {k: list(v.shape) for k, v in feeds.items()},
                "seconds": results,
            },
        )
        rows.append((name, results))
    backends = sorted({b for _, r in rows for b in r})
    print(
        f"\n{torch.cuda.get_device_name(0)}, preset {args.preset}, p50 ms at opt shapes "
        f"(CUDA events, {args.runs} runs)"
    )
    print(f"{'component':<18}" + "".join(f"{b:>15}" for b in backends))
    for name, results in rows:
        cells = [
            f"{results[b]['p50'] * 1e3:>15.3f}" if b in results else f"{'-':>15}" for b in backends
        ]
        print(f"{name:<18}" + "".join(cells))
    print(f"total wall {time.perf_counter() - start:.0f}s; numpy {np.__version__}")


if __name__ == "__main__":
    main()
