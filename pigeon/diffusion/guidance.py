"""Classifier-free guidance with zero negatives.

The unconditional branch sees all-zero `prompt_embeds` and `pooled_embeds` and the same `time_ids` (and
the same `reference_latents` for a UNet with `unet.reference_input`: guidance amplifies the tokens).
"""

from __future__ import annotations

import numpy as np


def cfg_combine(noise_cond: np.ndarray, noise_uncond: np.ndarray, scale: float) -> np.ndarray:
    """eps = eps_u + s (eps_c - eps_u)."""
    return noise_uncond + scale * (noise_cond - noise_uncond)


def needs_unconditional(scale: float) -> bool:
    """Guidance 1 is the conditional branch alone: skip the unconditional half of the UNet batch."""
    return scale != 1.0


def cfg_batch(
    prompt_embeds: np.ndarray, pooled_embeds: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """[conditional; zero negatives] along the batch axis, or the conditional alone at scale 1."""
    if not needs_unconditional(scale):
        return prompt_embeds, pooled_embeds
    return (
        np.concatenate([prompt_embeds, np.zeros_like(prompt_embeds)]),
        np.concatenate([pooled_embeds, np.zeros_like(pooled_embeds)]),
    )


def split_guidance(noise_pred: np.ndarray, scale: float) -> np.ndarray:
    """Undo `cfg_batch`: combine the two halves of the UNet output."""
    if not needs_unconditional(scale):
        return noise_pred
    cond, uncond = np.split(noise_pred, 2)
    return cfg_combine(cond, uncond, scale)
