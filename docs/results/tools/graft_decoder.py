"""Put a decoder-stage UNet into a later stage's checkpoint: how `runs/small4` was assembled.

    PYTHONPATH=. python docs/results/tools/graft_decoder.py --decoder RUN/decoder/best \
        --into OLD_RUN/sft/best --out RUN/sft/best

The `decoder` stage trains the UNet alone (`pigeon.training.stages.stage_parameters`). The lmm and
sft stages neither read nor write the UNet: they read the history encoder's tokens and the condition
adapter's reference embedding, which the decoder stage leaves as they were. So an lmm or sft stage
retrained after the decoder stage, with the same seeds, learns what it learned before, and swapping the
decoder's UNet into the old stage's checkpoint gives the same model without the retraining. The swap
is refused unless every weight the decoder read (history encoder, condition adapter, VAE) is
bit-identical in both checkpoints. DPO renders images with the UNet to rank its pairs, so it must be
retrained on top of the grafted sft checkpoint, not grafted.
"""

import argparse
import dataclasses

import torch

from pigeon.checkpoint import load_checkpoint, save_checkpoint

SHARED = ("history_encoder.", "condition_adapter.", "vae.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", required=True, help="a decoder-stage checkpoint")
    parser.add_argument(
        "--into", required=True, help="an lmm or sft checkpoint of the same tokenizer"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    decoder, target = load_checkpoint(args.decoder), load_checkpoint(args.into)
    theirs = decoder.model.state_dict()
    ours = target.model.state_dict()
    for name, value in theirs.items():
        if name.startswith(SHARED) and not torch.equal(value, ours[name]):
            raise SystemExit(f"{args.into}: {name} differs from {args.decoder}'s; not the same run")
    model = target.model
    model.unet = decoder.model.unet
    model.config = dataclasses.replace(target.config, unet=decoder.config.unet)
    save_checkpoint(model, target.tokenizer, args.out)
    print(f"{args.out}: {args.into} with the UNet of {args.decoder}")


if __name__ == "__main__":
    main()
