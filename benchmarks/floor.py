"""The floor: FLOPs one request costs, counted from the model, and this machine's peak, measured.

    python -m benchmarks.floor --preset small

FLOPs come from `torch.utils.flop_counter` over every component call of one real request (matmuls,
convolutions, attention), so they follow the actual prompt length, generated tokens and denoising
steps. The peak is the best of several large fp32 matrix products in the same process. Efficiency =
FLOPs / (latency x peak): how close a measured latency is to what the arithmetic alone would allow.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


class FlopCountingRunner:
    """A TorchRunner that counts the FLOPs of every component call."""

    name = "pytorch-flops"

    def __init__(self, model) -> None:
        from pigeon.inference.runners import TorchRunner

        self.inner = TorchRunner(model)
        self.flops: dict[str, int] = {}

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        spec = self.inner.specs[component]
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names]
        # grad mode on: the counter's module tracker hooks into autograd (no backward is run)
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            outputs = self.inner.modules[component](*args)
        self.flops[component] = self.flops.get(component, 0) + counter.get_total_flops()
        return {n: o.detach().numpy() for n, o in zip(spec.output_names, outputs, strict=True)}


def request_flops(checkpoint: str | Path, request) -> dict[str, int]:
    """FLOPs per component for one request (PyTorch reference path)."""
    from pigeon.checkpoint import load_checkpoint
    from pigeon.inference.pipeline import PigeonPipeline

    ckpt = load_checkpoint(checkpoint)
    runner = FlopCountingRunner(ckpt.model)
    PigeonPipeline(ckpt.config, ckpt.tokenizer, runner)(request)
    return runner.flops


def machine_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of this process (FLOP/s), torch's default threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def main() -> None:
    from benchmarks.common import prepare, procedural_request

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    checkpoint, _ = prepare(args.preset, f"runs/bench-{args.preset}")
    from pigeon.checkpoint import load_config

    flops = request_flops(checkpoint, procedural_request(load_config(checkpoint).image_size))
    peak = machine_peak_flops()
    total = sum(flops.values())
    print(
        f"FLOPs per request ({args.preset}): {total / 1e9:.2f} GFLOP; machine peak "
        f"{peak / 1e9:.1f} GFLOP/s -> floor {total / peak * 1e3:.1f} ms"
    )
    for name, value in flops.items():
        print(f"  {name:<18}{value / 1e9:>10.3f} GFLOP")


if __name__ == "__main__":
    main()
