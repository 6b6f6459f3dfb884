"""The history's colours at the image-to-image start (`scheduler.style_start`).

Below strength 1 denoising starts from the reference noised to ~strength T, so the reference's layout
*and its colours* survive into the image. `style_start` recolours the reference's foreground from the
user's history before it is encoded, so the start already carries the history's palette and the
steps left only have to redraw the shapes:

    moments    each RGB channel of the reference's foreground shifted and scaled to the mean and
               standard deviation of the history's foreground pixels (Reinhard et al. 2001, colour
               transfer between images, here in RGB)
    histogram  each channel's foreground values mapped onto the history's foreground quantiles at
               the same ranks (histogram matching)

Foreground is every pixel that is not white: EmojiPrefs and `core.images` composite on white. The
white background stays white. Pure NumPy, so the in-process pipeline and the Triton `preprocess`
model run the same function; a history without foreground (all white) leaves the reference as it is.
"""

from __future__ import annotations

import numpy as np

from pigeon.config import STYLE_STARTS

WHITE = 0.96  # a pixel whose every channel is at least this is background


def foreground(images: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) in [0, 1] -> bool (..., H, W): the pixels that are not white."""
    return images.min(axis=-3) < WHITE


def recolour(reference: np.ndarray, history: np.ndarray, method: str) -> np.ndarray:
    """reference (3, H, W) and history (N, 3, h, w), float in [0, 1] -> the reference (3, H, W)
    with its foreground's colours taken from the history's foreground by `method`."""
    if method not in STYLE_STARTS:
        raise ValueError(f"style_start={method!r} is not one of {', '.join(STYLE_STARTS)}")
    ref_mask = foreground(reference)  # (H, W)
    hist_pixels = history.transpose(1, 0, 2, 3)[:, foreground(history)]  # (3, pixels of all N)
    if method == "none" or ref_mask.sum() < 2 or hist_pixels.shape[1] < 2:
        return reference
    ref_pixels = reference[:, ref_mask].astype(np.float64)  # (3, P)
    if method == "moments":
        mean_r, std_r = ref_pixels.mean(1, keepdims=True), ref_pixels.std(1, keepdims=True)
        mean_h, std_h = hist_pixels.mean(1, keepdims=True), hist_pixels.std(1, keepdims=True)
        moved = (ref_pixels - mean_r) / np.maximum(std_r, 1e-6) * std_h + mean_h
    else:
        # rank of each reference pixel within its channel -> the history's value at that quantile
        ranks = ref_pixels.argsort(1).argsort(1)
        quantiles = (ranks + 0.5) / ref_pixels.shape[1]
        # np.quantile's linear rule, from one sort (np.quantile partitions once per quantile)
        ordered = np.sort(hist_pixels, axis=1).astype(np.float64)
        grid = np.arange(ordered.shape[1])
        moved = np.stack(
            [np.interp(quantiles[c] * (len(grid) - 1), grid, ordered[c]) for c in range(3)]
        )
    out = reference.copy()
    out[:, ref_mask] = np.clip(moved, 0.0, 1.0).astype(reference.dtype)
    return out


def recolour_image(reference: np.ndarray, history: list[np.ndarray], method: str) -> np.ndarray:
    """`recolour` on uint8 (H, W, 3) images, as training data holds them -> uint8 (H, W, 3)."""

    def chw(image: np.ndarray) -> np.ndarray:  # uint8 (H, W, 3) -> float (3, H, W) in [0, 1]
        return image.transpose(2, 0, 1).astype(np.float32) / 255.0

    out = recolour(chw(reference), np.stack([chw(h) for h in history]), method)
    return (out.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
