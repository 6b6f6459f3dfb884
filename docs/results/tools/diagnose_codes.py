"""Do the history and its masks reach the personalizer's generated codes? (docs/RESULTS.md §4)

    PYTHONPATH=. python docs/results/tools/diagnose_codes.py [--run runs/small2] [--users 16]

The first validation users of EmojiPrefs, in-process PyTorch, the checkpoint's own decoding: how many
distinct code sequences and codes the personalizer generates, and how often a position's code stays
the same with the mask generator off, or with another user's history.
"""

import argparse
import dataclasses

import numpy as np

from benchmarks.variants import quality_requests
from pigeon.checkpoint import load_checkpoint
from pigeon.config import apply_overrides
from pigeon.evaluation.data import load_eval_data
from pigeon.inference.pipeline import PigeonPipeline
from pigeon.inference.runners import TorchRunner


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean share of positions (over the shorter sequence) with the same code."""
    return float(np.mean([np.mean(x[: len(y)] == y[: len(x)]) for x, y in zip(a, b, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/small2")
    parser.add_argument("--data", default="demo/data/emojiprefs")
    parser.add_argument("--users", type=int, default=16)
    args = parser.parse_args()
    ckpt = load_checkpoint(f"{args.run}/dpo/best")
    data = load_eval_data(args.data, "val", args.users)
    requests = quality_requests(data, data.cases, ckpt.config, 1)  # one denoising step: codes only

    def codes(config, requests) -> list[np.ndarray]:
        pipe = PigeonPipeline(config, ckpt.tokenizer, TorchRunner(ckpt.model))
        return [pipe(r)[0].tokens for r in requests]

    own = codes(ckpt.config, requests)
    mask_off = codes(apply_overrides(ckpt.config, ["mask_generator.mask_type=none"]), requests)
    n = len(requests)
    other = [
        dataclasses.replace(r, history=requests[(i + 1) % n].history)
        for i, r in enumerate(requests)
    ]
    swapped = codes(ckpt.config, other)
    print(f"distinct code sequences over {n} users: {len({tuple(x) for x in own})}")
    print(f"distinct codes generated: {len(set(np.concatenate(own).tolist()))}")
    print(f"sequence lengths: {sorted({len(x) for x in own})}")
    print(f"same code, trained masks vs mask generator off: {agreement(own, mask_off):.3f}")
    print(f"same code, own history vs the next user's: {agreement(own, swapped):.3f}")


if __name__ == "__main__":
    main()
