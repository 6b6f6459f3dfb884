"""GPU check (one short run on a lent H100/H200): time, check parity, export, validate, TensorRT.

    bash benchmarks/gpu_check.sh                      # the committed checkpoints/small
    python -m benchmarks.gpu_check --device cpu --runs 3 --skip-compile   # dry run of this script

Phases, each recorded as ok / skipped (why) / failed (error) so one failure never hides the rest:
1. per component at its opt shape, CUDA-event timings: PyTorch eager fp32 and eager under fp16
   autocast (SDPA then takes the fused flash/memory-efficient kernels);
2. end to end (`PigeonPipeline`, one procedural request, per-stage wall times) on the device in fp32
   with the KV cache round-tripping through NumPy and kept on the device, fp16 autocast, and fp16
   autocast with `runners.GPU_COMPILE` (torch.compile: CUDA graphs for the fixed-shape components),
   and the same request on the CPU: the max pixel difference of each device image from the CPU
   image (same seed: the noise is drawn by numpy, so only arithmetic differs);
3. ONNX export + validation against PyTorch (CPU ONNX Runtime, as everywhere);
4. TensorRT fp16 engines (built and validated against ONNX Runtime first) and ONNX Runtime's CUDA
   provider, each timed where it is installed (neither is in the lent machine's image, and neither
   fits the 64 MiB a call may carry, so there both phases report 'skipped' with the reason);
5. the UNet under `torch.compile` (reduce-overhead: Inductor kernels replayed as a CUDA graph), last
   because its compile time is the least predictable; `--budget` interrupts whatever still runs.
Prints the tables last; appends JSON lines to benchmarks/results/gpu_check.jsonl.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import (
    append_jsonl,
    environment,
    export_artifacts,
    measure,
    percentiles,
    prepare,
    procedural_request,
    timestamp,
)

RESULTS = "benchmarks/results/gpu_check.jsonl"


def device_time(fn: Callable[[], object], device: str, warmup: int, runs: int) -> dict[str, float]:
    """Seconds per call: CUDA events on a GPU (the device's own clock), wall time on the CPU."""
    if device != "cuda":
        return measure(fn, warmup, runs)
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


class OutOfTime(Exception):
    pass


def _out_of_time(signum, frame) -> None:
    raise OutOfTime("the --budget ran out during this phase")


class Phases:
    """Runs each phase, keeps its outcome, never lets one failure stop the others."""

    def __init__(self, started: float, budget_s: float) -> None:
        self.started, self.budget_s = started, budget_s
        self.outcomes: list[tuple[str, str]] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self, name: str, fn: Callable[[], object], needs_s: float = 0.0) -> object:
        """`fn()`, or None when it fails, or when less than `needs_s` of the budget is left. A
        phase still running when the budget ends is interrupted (SIGALRM), so the report prints."""
        left = self.budget_s - self.elapsed()
        if left < needs_s:
            self.outcomes.append((name, f"skipped: {self.elapsed():.0f}s used of {self.budget_s}s"))
            return None
        begin = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        signal.signal(signal.SIGALRM, _out_of_time)
        signal.alarm(max(1, int(left)))
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - a phase's failure is a result to report
            traceback.print_exc()
            self.outcomes.append((name, f"failed: {type(exc).__name__}: {exc}"[:300]))
            return None
        finally:
            signal.alarm(0)
        self.outcomes.append((name, f"ok ({time.perf_counter() - begin:.0f}s)"))
        return result

    def skip(self, name: str, why: str) -> None:
        self.outcomes.append((name, f"skipped: {why}"))


def time_components(ckpt, device: str, runs: int) -> dict[str, dict]:
    """{component: {backend: seconds, "shapes": ...}} at each component's opt shape."""
    import torch

    model = ckpt.model.to(device).eval()
    table: dict[str, dict] = {}
    for name, (module, args, feeds) in component_calls(ckpt, model, device).items():
        row = table.setdefault(name, {"shapes": {k: list(v.shape) for k, v in feeds.items()}})
        with torch.inference_mode():
            row["eager_fp32"] = device_time(lambda m=module, a=args: m(*a), device, 3, runs)
            if device == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    row["eager_fp16"] = device_time(lambda m=module, a=args: m(*a), device, 3, runs)
    return table


def time_compiled_unet(ckpt, device: str, runs: int) -> dict[str, float]:
    """The UNet under torch.compile (reduce-overhead: Inductor kernels replayed as a CUDA graph)."""
    import torch

    model = ckpt.model.to(device).eval()
    module, args, _ = component_calls(ckpt, model, device)["unet"]
    compiled = torch.compile(module, mode="reduce-overhead")
    with torch.inference_mode(), torch.autocast(device, dtype=torch.float16):
        begin = time.perf_counter()
        compiled(*args)
        compile_seconds = time.perf_counter() - begin
        timed = device_time(lambda: compiled(*args), device, 3, runs)
    return {"compiled_fp16": timed, "compile_seconds": compile_seconds}


def component_calls(ckpt, model, device: str) -> dict[str, tuple]:
    """{component: (module, device tensors, numpy feeds)} at each declared opt shape."""
    import torch

    from pigeon.models.export_wrappers import export_module
    from pigeon.specs import component_specs, sample_inputs

    calls = {}
    for name, spec in component_specs(ckpt.config).items():
        feeds = sample_inputs(spec, ckpt.config, "opt")
        tensors = [torch.from_numpy(feeds[n]).to(device) for n in spec.input_names]
        calls[name] = (export_module(model, name), tensors, feeds)
    return calls


# end-to-end modes: (fp16 autocast, torch.compile with GPU_COMPILE, KV cache resident on the device)
PIPELINE_MODES = {
    "fp32_host_kv": (False, False, False),  # the KV cache round-trips through NumPy every step
    "fp32": (False, False, True),
    "fp16_autocast": (True, False, True),
    "compiled_fp16": (True, True, True),
}


def time_pipeline(ckpt, device: str, runs: int, modes: list[str]) -> dict[str, dict]:
    """Per-stage wall seconds end to end on `device` in each of `modes` (`PIPELINE_MODES`), and
    each image's pixel difference from the CPU fp32 image of the same request and seed."""
    import contextlib

    import torch

    from pigeon.inference.pipeline import PigeonPipeline
    from pigeon.inference.runners import GPU_COMPILE, TorchRunner

    request = procedural_request(ckpt.config.image_size)
    cpu_image = PigeonPipeline(ckpt.config, ckpt.tokenizer, TorchRunner(ckpt.model, "cpu"))(
        request
    )[0].image
    out: dict[str, dict] = {}
    for mode in modes:
        fp16, compiled, resident = PIPELINE_MODES[mode]
        runner = TorchRunner(
            ckpt.model, device, compile=GPU_COMPILE if compiled else None, resident=resident
        )
        pipe = PigeonPipeline(ckpt.config, ckpt.tokenizer, runner)
        context = torch.autocast(device, dtype=torch.float16) if fp16 else contextlib.nullcontext()
        with context:
            begin = time.perf_counter()
            image = pipe(request)[0].image  # warm-up (compiles), and the image compared with CPU's
            first_call = time.perf_counter() - begin
            pipe(request)
            stages: dict[str, list[float]] = {}
            for _ in range(runs):
                for stage, seconds in pipe(request)[0].timings.items():
                    stages.setdefault(stage, []).append(seconds)
        diff = np.abs(image.astype(np.int16) - cpu_image.astype(np.int16))
        out[mode] = {
            "first_call_seconds": first_call,
            "stage_seconds": {s: percentiles(v) for s, v in stages.items()},
            "max_pixel_diff_vs_cpu": int(diff.max()),
            "mean_pixel_diff_vs_cpu": float(diff.mean()),
        }
    return out


def time_tensorrt(ckpt, artifacts: Path, runs: int, table: dict) -> None:
    """fp16 engines, built and validated against ONNX Runtime before use, timed per component."""
    from pigeon.export.tensorrt import export_tensorrt
    from pigeon.inference.runners import TrtRunner
    from pigeon.specs import component_specs, sample_inputs

    specs = component_specs(ckpt.config)
    export_tensorrt(artifacts, precision="fp16")
    runner = TrtRunner({n: artifacts / "tensorrt" / n / "engine.plan" for n in specs}, ckpt.config)
    for name, spec in specs.items():
        feeds = sample_inputs(spec, ckpt.config, "opt")
        table[name]["tensorrt_fp16"] = device_time(
            lambda n=name, f=feeds: runner.run(n, f), "cuda", 3, runs
        )


def time_ort_cuda(ckpt, artifacts: Path, runs: int, table: dict) -> None:
    """The exported fp32 graphs on ONNX Runtime's CUDA provider (host feeds, as a client sends)."""
    import onnxruntime as ort

    from pigeon.specs import component_specs, sample_inputs

    for name, spec in component_specs(ckpt.config).items():
        feeds = sample_inputs(spec, ckpt.config, "opt")
        session = ort.InferenceSession(
            str(artifacts / name / "model.onnx"), providers=["CUDAExecutionProvider"]
        )
        table[name]["ort_cuda"] = device_time(
            lambda s=session, f=feeds: s.run(None, f), "cuda", 3, runs
        )


def report(device_name: str, args, table: dict, pipeline: dict | None, phases: Phases) -> None:
    backends = [
        b
        for b in ("eager_fp32", "eager_fp16", "compiled_fp16", "ort_cuda", "tensorrt_fp16")
        if any(b in row for row in table.values())
    ]
    print(f"\n{device_name}, {args.checkpoint or 'random ' + args.preset}, {args.runs} runs")
    if table:
        print("components, p50 ms at opt shapes (CUDA events on a GPU)")
        print(f"{'component':<18}" + "".join(f"{b:>15}" for b in backends))
        for name, row in table.items():
            cells = [
                f"{row[b]['p50'] * 1e3:>15.3f}" if b in row else f"{'-':>15}" for b in backends
            ]
            print(f"{name:<18}" + "".join(cells))
        if "compile_seconds" in table.get("unet", {}):
            print(f"(unet torch.compile, first call: {table['unet']['compile_seconds']:.1f}s)")
    if pipeline:
        modes = list(pipeline)
        print("\nend to end, p50 ms per stage (wall time, one request)")
        print(f"{'stage':<18}" + "".join(f"{m:>16}" for m in modes))
        for stage in pipeline[modes[0]]["stage_seconds"]:
            cells = [f"{pipeline[m]['stage_seconds'][stage]['p50'] * 1e3:>16.1f}" for m in modes]
            print(f"{stage:<18}" + "".join(cells))
        diffs = [f"{pipeline[m]['max_pixel_diff_vs_cpu']:>16d}" for m in modes]
        print(f"{'max px diff vs CPU':<18}" + "".join(diffs))
        firsts = [f"{pipeline[m]['first_call_seconds']:>16.1f}" for m in modes]
        print(f"{'first call s':<18}" + "".join(firsts))
    print("\nphases")
    for name, outcome in phases.outcomes:
        print(f"  {name:<28} {outcome}")
    print(f"total wall {phases.elapsed():.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None, help="default: random weights of --preset")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per component")
    parser.add_argument("--pipeline-runs", type=int, default=10)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-export", action="store_true", help="no ONNX/TensorRT phases")
    parser.add_argument(
        "--budget", type=float, default=420, help="seconds for all phases (then one is interrupted)"
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=RESULTS, help="JSON lines file to append the record to")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from pigeon.checkpoint import load_checkpoint

    phases = Phases(time.perf_counter(), args.budget)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no GPU (use --device cpu)")
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    workdir = Path(args.workdir or f"runs/gpu-{args.preset}")
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        artifacts = workdir / "onnx-fp32"
    else:
        checkpoint, artifacts = prepare(args.preset, workdir)  # random init, exported
    ckpt = load_checkpoint(checkpoint)

    table = phases.run("components (eager)", lambda: time_components(ckpt, args.device, args.runs))
    table = table or {}
    eager_modes = ["fp32_host_kv", "fp32", "fp16_autocast"] if args.device == "cuda" else ["fp32"]
    pipeline = phases.run(
        "end to end (PigeonPipeline)",
        lambda: time_pipeline(ckpt, args.device, args.pipeline_runs, eager_modes),
        needs_s=30,
    )
    exported = None
    if args.skip_export:
        phases.skip("ONNX export + validation", "--skip-export")
    else:
        exported = phases.run(
            "ONNX export + validation",
            lambda: export_artifacts(checkpoint, artifacts) or True,
            needs_s=60,
        )
    if not exported or args.device != "cuda":
        phases.skip("TensorRT engines", "no export or no GPU")
    elif importlib.util.find_spec("tensorrt") is None:
        phases.skip("TensorRT engines", "tensorrt is not installed here")
    else:
        phases.run(
            "TensorRT engines",
            lambda: time_tensorrt(ckpt, artifacts, args.runs, table),
            needs_s=90,
        )
    if not exported or args.device != "cuda":
        phases.skip("ONNX Runtime CUDA", "no export or no GPU")
    elif "CUDAExecutionProvider" not in ort.get_available_providers():
        phases.skip("ONNX Runtime CUDA", f"providers here: {ort.get_available_providers()}")
    else:
        phases.run(
            "ONNX Runtime CUDA",
            lambda: time_ort_cuda(ckpt, artifacts, args.runs, table),
            needs_s=30,
        )
    if args.skip_compile or args.device != "cuda":
        phases.skip("torch.compile", "--skip-compile or no GPU")
    else:
        compiled = phases.run(
            "unet torch.compile",
            lambda: time_compiled_unet(ckpt, args.device, args.runs),
            needs_s=60,
        )
        table.setdefault("unet", {}).update(compiled or {})
        compiled = phases.run(
            "end to end, compiled",
            lambda: time_pipeline(ckpt, args.device, args.pipeline_runs, ["compiled_fp16"]),
            needs_s=90,
        )
        pipeline = {**(pipeline or {}), **(compiled or {})}
    append_jsonl(
        args.out,
        {
            "benchmark": "gpu_check",
            "time": timestamp(),
            "env": environment(),
            "device": device_name,
            "checkpoint": str(checkpoint),
            "components": table,
            "pipeline": pipeline,
            "phases": dict(phases.outcomes),
        },
    )
    report(device_name, args, table, pipeline, phases)


if __name__ == "__main__":
    main()
