"""Where a VAE loses colour (docs/RESULTS.md §15), on the first 64 validation targets: the mean
round-trip error per channel over sticker pixels (not the white background) for each CHECKPOINT.
For the first: the same over 256 training images, how far darkening the green channel moves the
latents and the decoded green, and how far optimising the latents against its decoder (150 Adam
steps) brings the error down.

    PYTHONPATH=. python docs/results/tools/vae_colour.py CHECKPOINT [CHECKPOINT ...]
"""

import sys

import numpy as np
import torch

from pigeon.checkpoint import load_checkpoint
from pigeon.evaluation.data import load_eval_data
from pigeon.training.data import load_data

data = load_eval_data("data/emojiprefs", "val", limit=64)
x = torch.from_numpy(data.truth(data.cases)).permute(0, 3, 1, 2).float() / 127.5 - 1
sticker = (x.mean(1, keepdim=True) < 0.8).float()  # (N, 1, H, W): not the white background


def channel_error(y: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> list[float]:
    err = (y.clamp(-1, 1) - target).abs() * mask
    return [round(v, 4) for v in (err.sum((0, 2, 3)) / mask.sum()).tolist()]


models = {
    path: load_checkpoint(path).model.float().eval().requires_grad_(False) for path in sys.argv[1:]
}
for path, model in models.items():
    with torch.no_grad():
        y = model.vae.decode(model.vae.encode(x).latent_dist.mean).sample
    print(path, "R / G / B error over sticker pixels", channel_error(y, x, sticker))

vae = next(iter(models.values())).vae
images, _ = load_data("data/emojiprefs", 64).images(np.random.default_rng(0), 256)
train = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
with torch.no_grad():
    y = vae.decode(vae.encode(train).latent_dist.mean).sample
train_sticker = (train.mean(1, keepdim=True) < 0.8).float()
print(
    "training images: R / G / B error over sticker pixels", channel_error(y, train, train_sticker)
)
x16, mask16 = x[:16], sticker[:16]
darker = x16.clone()
darker[:, 1] -= 0.3 * (x16[:, 1] < 0.8).float()
with torch.no_grad():
    z, z_dark = vae.encode(x16).latent_dist.mean, vae.encode(darker).latent_dist.mean
    y, y_dark = vae.decode(z).sample, vae.decode(z_dark).sample
print(
    "latent spread",
    round(z.std().item(), 3),
    "moved by (rms)",
    round((z_dark - z).pow(2).mean().sqrt().item(), 3),
)
print(
    "green darkened by",
    round(float(((darker - x16)[:, 1:2] * mask16).sum() / mask16.sum()), 3),
    "decoded green moved by",
    round(float(((y_dark - y)[:, 1:2] * mask16).sum() / mask16.sum()), 3),
)
torch.manual_seed(0)
latents = z.clone().requires_grad_(True)
optimizer = torch.optim.Adam([latents], lr=0.05)
for _ in range(150):
    loss = (vae.decode(latents).sample - x16).abs().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(
    "encoder's latents",
    channel_error(y, x16, mask16),
    "optimised latents",
    channel_error(vae.decode(latents).sample.detach(), x16, mask16),
)
