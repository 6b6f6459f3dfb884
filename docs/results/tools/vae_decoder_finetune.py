"""Can the VAE's decoder alone raise the style ceiling? (docs/RESULTS.md §4)

    PYTHONPATH=. python docs/results/tools/vae_decoder_finetune.py CHECKPOINT STEPS BATCH EDGE_WEIGHT
    PYTHONPATH=. python docs/results/tools/vae_decoder_finetune.py runs/small4/dpo/best 300 16 1.0

Fine-tunes only the VAE decoder (and post_quant_conv) on frozen posterior-mean latents of EmojiPrefs
training images, with L1 + EDGE_WEIGHT x L1 of the image gradients, and every 150 steps scores the
reconstructions of the first 64 validation targets with the frozen StyleNet / ConceptNet. The latent
space does not move, so every network trained on it stays valid. Not part of the recipe.
"""

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from pigeon.checkpoint import load_checkpoint
from pigeon.core.images import to_uint8
from pigeon.evaluation.data import load_eval_data
from pigeon.evaluation.evaluate import Scorer
from pigeon.evaluation.external import External
from pigeon.evaluation.metric_nets import MetricNets
from pigeon.evaluation.metrics import resize_images
from pigeon.inference.pipeline import to_model_input
from pigeon.models.pigeon import to_tensor
from pigeon.training.data import EmojiPrefsData

DECODER = ("decoder.", "post_quant_conv.")


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def main() -> None:
    checkpoint, steps, batch, edge = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        float(sys.argv[4]),
    )
    model = load_checkpoint(checkpoint).model
    vae = model.vae
    data = EmojiPrefsData("demo/data/emojiprefs", 64)
    val = load_eval_data("demo/data/emojiprefs", "val", 64)
    scorer = Scorer(val, MetricNets.load(), enl0=None, external=External())
    case_set = scorer.case_set(val.cases)
    targets = torch.from_numpy(np.stack([to_model_input(t, 64) for t in val.truth(val.cases)]))

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = vae.encode(x * 2 - 1).latent_dist.mean
            return (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)

    def score(tag: str) -> None:
        model.eval()
        images = reconstruct(targets)
        per, _, _ = scorer.score(resize_images(to_uint8(images.numpy()), val.size), case_set)
        l1 = float((images - targets).abs().mean())
        print(
            f"{tag}: StyleAcc {per['style_acc'].mean():.3f} "
            f"R@5 {per['concept_r5'].mean():.3f} L1 {l1:.4f}",
            flush=True,
        )

    score("before")
    params = [p for n, p in vae.named_parameters() if n.startswith(DECODER)]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    start = time.time()
    for step in range(steps):
        model.train()
        images, _ = data.images(np.random.default_rng([7, step]), batch)
        x = to_tensor(images) * 2 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample
        loss = F.l1_loss(y, x)
        if edge:
            (gy, gx), (ty, tx) = image_gradients(y), image_gradients(x)
            loss = loss + edge * (F.l1_loss(gy, ty) + F.l1_loss(gx, tx))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(step, loss.item(), f"{(time.time() - start) / (step + 1):.2f}s/step", flush=True)
        if (step + 1) % 150 == 0:
            score(f"step {step + 1}")


if __name__ == "__main__":
    main()
