"""Can the image generator draw a style from tokens at all? (docs/RESULTS.md §4)

    PYTHONPATH=. python docs/results/tools/token_bound.py [--checkpoint checkpoints/small] [--users 64] \
        [--strengths 1.0 0.8] [--guidances 1 3 7]

Splits Pigeon's miss between its two halves on the first validation users of EmojiPrefs. The same
condition adapter + UNet + VAE decoder (same seeds, same sampler) are fed three token sets:
  generated  the personalizer's codes (what `pigeon generate` does)
  target     the ground-truth target image's own kept tokens (an oracle personalizer: the upper
             bound of the image half)
  history    the kept tokens of the user's last history image (right style, other concept)
and each is scored with the frozen StyleNet / ConceptNet of `pigeon evaluate`, at each strength.
If `target` is far above `generated`, the personalizer is what misses; if `target` is near the
fixed-style baseline, the tokenizer + UNet cannot carry a style and better decoding will not help.
First it scores the target images passed through the VAE alone (encode, decode): no generated image
can carry more of the style than the VAE's reconstruction does.
"""

import argparse
import itertools

import numpy as np

from benchmarks.variants import quality_requests
from pigeon.checkpoint import load_checkpoint
from pigeon.core.images import to_uint8
from pigeon.evaluation.chain import draw, kept_codes
from pigeon.evaluation.data import load_eval_data
from pigeon.evaluation.evaluate import Scorer
from pigeon.evaluation.external import External
from pigeon.evaluation.metric_nets import MetricNets
from pigeon.evaluation.metrics import resize_images
from pigeon.inference.pipeline import PigeonPipeline, to_model_input
from pigeon.inference.runners import TorchRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default="checkpoints/small")
    parser.add_argument("--data", default="demo/data/emojiprefs")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.8])
    parser.add_argument(
        "--guidances", type=float, nargs="+", default=None, help="default: the checkpoint's"
    )
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    pipe = PigeonPipeline(ckpt.config, ckpt.tokenizer, TorchRunner(ckpt.model))
    data = load_eval_data(args.data, "val", args.users)
    scorer = Scorer(data, MetricNets.load(), enl0=None, external=External())
    case_set = scorer.case_set(data.cases)
    requests = quality_requests(data, data.cases, ckpt.config, None)
    token_sets = {
        "generated": [pipe(r)[0].tokens for r in requests],
        "target": kept_codes(pipe, list(data.truth(data.cases))),
        "history": kept_codes(pipe, [r.history[-1] for r in requests]),
    }
    print(f"{args.checkpoint}, {len(requests)} val users")
    size = ckpt.config.image_size
    targets = np.stack([to_model_input(t, size) for t in data.truth(data.cases)])
    latents = pipe.runner.run("vae_encoder", {"images": targets})["latents"]
    reconstructed = to_uint8(pipe.runner.run("vae_decoder", {"latents": latents})["images"])
    per, _, _ = scorer.score(resize_images(reconstructed, data.size), case_set)
    print(
        f"VAE reconstruction of the targets (the ceiling): StyleAcc {per['style_acc'].mean():.3f}, "
        f"R@5 {per['concept_r5'].mean():.3f}"
    )
    print(
        f"{'tokens':<10}{'strength':>9}{'guidance':>9}{'StyleAcc':>10}{'R@5':>7}"
        f"{'distinct seqs':>15}{'mean len':>10}"
    )
    guidances = args.guidances or [ckpt.config.scheduler.guidance_scale]
    for strength, guidance in itertools.product(args.strengths, guidances):
        for r in requests:  # draw() takes the guidance from the requests
            r.guidance = guidance
        for name, codes in token_sets.items():
            images = np.concatenate(
                [
                    draw(pipe, codes[i : i + 8], requests[i : i + 8], strength)
                    for i in range(0, len(requests), 8)
                ]
            )
            per, _, _ = scorer.score(resize_images(images, data.size), case_set)
            distinct = len({tuple(c.tolist()) for c in codes})
            print(
                f"{name:<10}{strength:>9.1f}{guidance:>9.1f}{per['style_acc'].mean():>10.3f}"
                f"{per['concept_r5'].mean():>7.3f}{distinct:>15d}{np.mean([len(c) for c in codes]):>10.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
