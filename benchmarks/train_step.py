"""A training step of the image or decoder stage with the frozen encoders' cache off and warm, side by
side in one run.

    python -m benchmarks.train_step --stage decoder --data data/emojiprefs [--runs 8]

The same model, batches and settings in both arms (`small`, the recipe's batch, the style term and
Min-SNR on, the decoder stage with history tokens for half the batch); the arms alternate step by
step, so load on the machine falls on both alike. `off` encodes every batch afresh
(`train.frozen_cache_mib=0`); `warm` looks up every image's VAE latents (and, in the decoder stage,
its tokens), as a stage does once it has drawn each image. `fill` is what the first draw of an image
costs with the cache on: the batch encoded image by image. One JSON line per arm; a step is the
objective's forward and backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from benchmarks.common import append_jsonl, environment, percentiles, timestamp


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=("image", "decoder"), default="decoder")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--data", default="data/emojiprefs")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    parser.add_argument("--runs", type=int, default=8, help="timed steps per arm")
    parser.add_argument("--out", default="benchmarks/results/train_step.jsonl")
    args = parser.parse_args()

    from pigeon.config import preset
    from pigeon.core.prompt import PromptBuilder
    from pigeon.models.pigeon import PigeonModel
    from pigeon.training.data import load_data
    from pigeon.training.frozen import FrozenEncodings
    from pigeon.training.loop import Dist, StageModule, make_batch, recipe
    from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

    config = dataclasses.replace(
        recipe(args.preset)[args.stage],
        precision="fp32",
        style_weight=1.0,
        snr_gamma=5.0,
        history_token_share=0.5 if args.stage == "decoder" else 0.0,
        reference="other_style",
    )
    model = PigeonModel(preset(args.preset))
    if args.stage == "decoder":
        model.enable_reference_input()
    data = load_data(args.data, model.config.image_size)
    tokenizer = TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, 320), 320)
    builder = PromptBuilder(tokenizer, model.vocab)
    arms = {
        name: StageModule(
            model,
            args.stage,
            builder,
            dataclasses.replace(config, frozen_cache_mib=mib),
            style_count=len(data.style_names),
        ).train()
        for name, mib in (("off", 0.0), ("warm", 1024.0))
    }
    batches = [make_batch(data, config, k, Dist(), "cpu") for k in range(args.batches)]

    def step(arm: str, k: int) -> float:
        start = time.perf_counter()
        loss = arms[arm](batches[k % len(batches)])
        model.zero_grad(set_to_none=True)
        loss.backward()
        return time.perf_counter() - start

    fill = []
    for k in range(len(batches)):  # each batch's first draw into an empty cache; warms both arms
        step("off", k)
        arms["warm"].frozen = FrozenEncodings(1024.0)
        fill.append(step("warm", k))
    warm_cache = FrozenEncodings(1024.0)
    arms["warm"].frozen = warm_cache
    for k in range(len(batches)):
        step("warm", k)
    times: dict[str, list[float]] = {"off": [], "warm": [], "fill": fill}
    for k in range(args.runs):
        for arm in ("off", "warm"):
            times[arm].append(step(arm, k))
    env = environment()
    for arm, values in times.items():
        row = {
            "benchmark": "train_step",
            "time": timestamp(),
            "stage": args.stage,
            "preset": args.preset,
            "batch": config.batch_size,
            "arm": arm,
            "seconds": percentiles(values),
            "cache": warm_cache.summary() if arm == "warm" else None,
            **env,
        }
        append_jsonl(args.out, row)
        print(f"{args.stage} {arm:>5}: p50 {row['seconds']['p50']:.3f} s a step (n={len(values)})")
    ratio = percentiles(times["off"])["p50"] / percentiles(times["warm"])["p50"]
    print(f"off / warm: {ratio:.2f}x")


if __name__ == "__main__":
    main()
