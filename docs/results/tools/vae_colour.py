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


def sticker_mean(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of `values` over the target's sticker pixels (not the white background)."""
    sticker = (target.mean(1, keepdim=True) < 0.8).float()  # (N, 1, H, W)
    return (values * sticker).sum((0, 2, 3)) / sticker.sum()


def channel_error(y: torch.Tensor, target: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in sticker_mean((y.clamp(-1, 1) - target).abs(), target).tolist()]


@torch.no_grad()
def round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.encode(images).latent_dist.mean).sample


models = {
    path: load_checkpoint(path).model.float().eval().requires_grad_(False) for path in sys.argv[1:]
}
for path, model in models.items():
    print(path, "R / G / B error over sticker pixels", channel_error(round_trip(model.vae, x), x))

vae = next(iter(models.values())).vae
images, _ = load_data("data/emojiprefs", 64).images(np.random.default_rng(0), 256)
train = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
print("training images: R / G / B error", channel_error(round_trip(vae, train), train))

x16 = x[:16]
darker = x16.clone()
darker[:, 1] -= 0.3 * (x16[:, 1] < 0.8).float()
with torch.no_grad():
    z, z_dark = vae.encode(x16).latent_dist.mean, vae.encode(darker).latent_dist.mean
    y, y_dark = vae.decode(z).sample, vae.decode(z_dark).sample
moved = (z_dark - z).pow(2).mean().sqrt()
print(f"latent spread {z.std():.3f} moved by (rms) {moved:.3f}")
darkened, followed = sticker_mean(darker - x16, x16)[1], sticker_mean(y_dark - y, x16)[1]
print(f"green darkened by {darkened:.3f} decoded green moved by {followed:.3f}")

torch.manual_seed(0)
latents = z.clone().requires_grad_(True)
optimizer = torch.optim.Adam([latents], lr=0.05)
for _ in range(150):
    loss = (vae.decode(latents).sample - x16).abs().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
optimised = vae.decode(latents).sample.detach()
print(
    "encoder's latents", channel_error(y, x16), "optimised latents", channel_error(optimised, x16)
)
