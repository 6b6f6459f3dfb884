"""Metric math with no networks: pixel agreement, Frechet distance, KID, retrieval, style scores,
copy detection and bootstrap confidence intervals (docs/RESULTS.md §2).

Everything works on NumPy arrays; images are uint8 (N, H, W, 3) or float in [0, 1]. Each function is
checked in tests/test_evaluation.py against a second, straightforward implementation or a closed form.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pigeon.evaluation.errors import EvaluationError
from pigeon.evaluation.options import COPY_THRESHOLD

PSNR_CAP_DB = 100.0  # identical images: PSNR is infinite; capped so that means stay finite
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_CHUNK = 256


class MetricError(EvaluationError):
    """Inputs a metric cannot use; the message names the argument and its shape or value."""


def as_float(images: np.ndarray, name: str = "images") -> np.ndarray:
    """uint8 or float images (N, H, W, 3) -> float64 in [0, 1]."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise MetricError(f"{name}: expected (N, H, W, 3) images, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    return x.astype(np.float64)


def resize_images(images: np.ndarray, size: int, box: bool = False) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, size, size, 3); bicubic, or box filtering to shrink without aliasing."""
    images = np.asarray(images)
    if images.shape[1] == size and images.shape[2] == size:
        return images
    method = Image.Resampling.BOX if box else Image.Resampling.BICUBIC
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), method)) for im in images])


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_float(a, "generated"), as_float(b, "ground truth")
    if a.shape != b.shape:
        raise MetricError(f"generated {a.shape} and ground truth {b.shape} differ in shape")
    return a, b


# --- pixel agreement -----------------------------------------------------------------------------


def _gaussian_kernel(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation over axes 1 and 2 of (N, H, W, C)."""
    k = len(g)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(g[i] * x[:, i : i + h] for i in range(k))
    return sum(g[j] * rows[:, :, j : j + w] for j in range(k))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), 'valid' positions, data
    range 1, computed per RGB channel and averaged. Returns (N,)."""
    if np.shape(a) != np.shape(b):
        raise MetricError(f"generated {np.shape(a)} and ground truth {np.shape(b)} differ in shape")
    if len(a) > SSIM_CHUNK:  # bounded memory: about 12 float64 copies of a chunk at a time
        return np.concatenate(
            [
                ssim(a[i : i + SSIM_CHUNK], b[i : i + SSIM_CHUNK])
                for i in range(0, len(a), SSIM_CHUNK)
            ]
        )
    a, b = _check_pair(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise MetricError(f"SSIM needs images of at least {SSIM_WINDOW} px, got {a.shape[1:3]}")
    g = _gaussian_kernel()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.mean(axis=(1, 2, 3))


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB (data range 1), capped at PSNR_CAP_DB for identical images. (N,)"""
    a, b = _check_pair(a, b)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        out = 10 * np.log10(1.0 / mse)
    return np.minimum(out, PSNR_CAP_DB)


def content_mask(images: np.ndarray, threshold: int = 250) -> np.ndarray:
    """A coverage mask in [0, 1] (N, H, W) for images without alpha: pixels that are not white."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        x = np.round(as_float(x) * 255).astype(np.uint8)
    return (x.min(axis=-1) < threshold).astype(np.float64)


def masked_l1(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean |a - b| weighted by the ground truth's coverage `mask` (N, H, W) in [0, 1]. (N,)

    The emoji cover part of a white square; an unmasked L1 rewards a blank white output."""
    a, b = _check_pair(a, b)
    m = np.asarray(mask, dtype=np.float64)
    if m.shape != a.shape[:3]:
        raise MetricError(f"mask {m.shape} does not match images {a.shape[:3]}")
    err = np.abs(a - b).mean(axis=-1)  # (N, H, W)
    weight = m.sum(axis=(1, 2))
    out = (err * m).sum(axis=(1, 2)) / np.maximum(weight, 1e-12)
    return np.where(weight > 0, out, err.mean(axis=(1, 2)))


def mean_abs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain per-image mean absolute difference. (N,)"""
    a, b = _check_pair(a, b)
    return np.abs(a - b).mean(axis=(1, 2, 3))


# --- distribution distances ----------------------------------------------------------------------


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets x (n, d) and y (m, d):
    |mu_x - mu_y|^2 + tr(Sx + Sy - 2 (Sx Sy)^(1/2)).

    tr((Sx Sy)^(1/2)) = sum of sqrt(eigenvalues of Sx^(1/2) Sy Sx^(1/2)), a symmetric PSD matrix, so
    no complex-valued matrix square root is needed. With fewer samples than dimensions it is computed
    in sample space: the same trace is the nuclear norm of (Y - mu_y)(X - mu_x)^T / sqrt((n-1)(m-1)).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise MetricError(f"feature sets must be (n, d) and (m, d), got {x.shape} and {y.shape}")
    if len(x) < 2 or len(y) < 2:
        raise MetricError(f"Frechet distance needs >= 2 samples per set, got {len(x)} and {len(y)}")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    mean_term = float(((mx - my) ** 2).sum())
    tr_x = float((xc**2).sum() / (len(x) - 1))
    tr_y = float((yc**2).sum() / (len(y) - 1))
    d = x.shape[1]
    if d <= min(len(x), len(y)):
        sx = xc.T @ xc / (len(x) - 1)  # (d, d)
        sy = yc.T @ yc / (len(y) - 1)
        try:  # Sx = L L^T: L^T Sy L has the eigenvalues of Sx Sy; Cholesky is far cheaper than eigh
            low = np.linalg.cholesky(sx + np.eye(d) * (1e-12 * tr_x / d))
            m = low.T @ sy @ low
        except np.linalg.LinAlgError:  # singular Sx (constant features)
            root = _sqrt_psd(sx)
            m = root @ sy @ root
        w = np.linalg.eigvalsh((m + m.T) / 2)
        cross = float(np.sqrt(np.clip(w, 0, None)).sum())
    else:
        m = yc @ xc.T / np.sqrt((len(x) - 1) * (len(y) - 1))  # (m, n)
        cross = float(np.linalg.svd(m, compute_uv=False).sum())
    return max(0.0, mean_term + tr_x + tr_y - 2 * cross)


def frechet_gaussians(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Frechet distance of two Gaussians given by mean and covariance (the reference formula)."""
    root = _sqrt_psd(s1)
    w = np.linalg.eigvalsh(root @ s2 @ root)
    return float(
        ((mu1 - mu2) ** 2).sum()
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.sqrt(np.clip(w, 0, None)).sum()
    )


def kid(x: np.ndarray, y: np.ndarray, index: np.ndarray | None = None) -> float:
    """Kernel inception distance with the cubic kernel k(a, b) = (a.b / d + 1)^3.

    x and y are paired rows (the output and the ground truth of the same user), so this is the
    U-statistic MMD^2_u of Gretton et al. (2012, eq. 3): the mean over pairs i != j of
    k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i). It is unbiased and exactly 0 when the
    two sets are identical. `index` (a bootstrap resample of row numbers) evaluates it on
    x[index], y[index] without counting pairs that are the same original row twice."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or x.shape != y.shape:
        raise MetricError(
            f"KID needs paired feature sets of one shape, got {x.shape} and {y.shape}"
        )
    d = x.shape[1]
    rows = np.arange(len(x)) if index is None else np.asarray(index)
    x, y = x[rows], y[rows]
    distinct = rows[:, None] != rows[None, :]  # (n, n): pairs of different original rows
    if not distinct.any():
        raise MetricError(f"KID needs >= 2 distinct rows, got {len(np.unique(rows))}")
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    h = kxx + kyy - kxy - kxy.T
    return float(h[distinct].mean())


# --- retrieval and style --------------------------------------------------------------------------


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def ranks_of_targets(similarity: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of targets[i] in row i of similarity (Q, G), ties counted pessimistically
    (a gallery item with the same score as the target ranks ahead of it). (Q,)"""
    s = np.asarray(similarity)
    t = np.asarray(targets)
    own = s[np.arange(len(s)), t]
    return (s >= own[:, None]).sum(axis=1)


def prototype_ranks(
    query: np.ndarray,
    gallery: np.ndarray,
    target: np.ndarray,
    exclude: np.ndarray,
) -> np.ndarray:
    """Concept retrieval ranks against style-excluding prototypes (docs/RESULTS.md §2).

    query (Q, d) embeddings; gallery (G, K, d) embeddings of every gallery concept in every style;
    target (Q,) gallery index of each query's concept; exclude (Q, K) bool, the styles left out of
    that query's prototypes (the user's and the reference's style, so that neither the ground truth
    nor a reference copy matches its own image). Prototype = normalized mean over the other styles.
    """
    q = normalize(query)
    g = normalize(gallery)
    exclude = np.asarray(exclude, bool)
    if g.ndim != 3 or exclude.shape != (len(q), g.shape[1]):
        raise MetricError(
            f"gallery {g.shape} / exclude {exclude.shape} do not fit {len(q)} queries"
        )
    if exclude.all(axis=1).any():
        raise MetricError("a query excludes every style; no prototype left")
    ranks = np.zeros(len(q), dtype=np.int64)
    groups: dict[bytes, list[int]] = {}
    for i, row in enumerate(exclude):
        groups.setdefault(row.tobytes(), []).append(i)
    for key, members in groups.items():
        keep = ~np.frombuffer(key, dtype=bool)
        proto = normalize(g[:, keep].mean(axis=1))  # (G, d)
        idx = np.asarray(members)
        ranks[idx] = ranks_of_targets(q[idx] @ proto.T, np.asarray(target)[idx])
    return ranks


def retrieval_scores(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query R@1, R@5 and reciprocal rank from 1-based ranks."""
    r = np.asarray(ranks, np.float64)
    return {"r1": (r <= 1).astype(float), "r5": (r <= 5).astype(float), "rr": 1.0 / r}


def style_scores(probs: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """StyleAcc (argmax == target) and StyleMargin (p(target) - max other p) per image."""
    p = np.asarray(probs, np.float64)
    t = np.asarray(target)
    own = p[np.arange(len(p)), t]
    others = p.copy()
    others[np.arange(len(p)), t] = -np.inf
    return {"acc": (p.argmax(1) == t).astype(float), "margin": own - others.max(1)}


def confusion_matrix(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts: rows the true class, columns the prediction."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (np.asarray(true), np.asarray(pred)), 1)
    return m


# --- copying ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyConfig:
    """A generated image is a copy when, at `size` px (box-downsampled), its mean absolute
    difference to the reference or to a history image is below `threshold` and smaller than its
    difference to the ground truth."""

    size: int = 32
    threshold: float = COPY_THRESHOLD


def copy_flags(
    generated: np.ndarray,
    sources: Sequence[np.ndarray],
    truth: np.ndarray,
    config: CopyConfig = CopyConfig(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is_copy (N,), nearest source index (N,) with 0 = reference and 1.. = history, distance (N,)).

    sources[i]: uint8 (S_i, H, W, 3), the reference first, then the history of case i."""
    gen = resize_images(np.asarray(generated), config.size, box=True)
    gt = resize_images(np.asarray(truth), config.size, box=True)
    d_truth = mean_abs(gen, gt)
    flags, nearest, dist = [], [], []
    for i, src in enumerate(sources):
        s = resize_images(np.asarray(src), config.size, box=True)
        d = mean_abs(s, np.repeat(gen[i : i + 1], len(s), axis=0))
        j = int(d.argmin())
        nearest.append(j)
        dist.append(float(d[j]))
        flags.append(bool(d[j] < config.threshold and d[j] < d_truth[i]))
    return np.asarray(flags, float), np.asarray(nearest), np.asarray(dist)


# --- confidence intervals -------------------------------------------------------------------------


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row numbers drawn with replacement, seeded."""
    if n < 1:
        raise MetricError(f"bootstrap needs at least one case, got n={n}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_mean_ci(
    values: np.ndarray, indices: np.ndarray, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean over `indices` resamples.
    NaN marks a case the metric does not apply to; it is left out of every mean."""
    v = np.asarray(values, np.float64)
    if np.isnan(v).all():
        return float("nan"), float("nan"), float("nan")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample of only NaNs
        means = np.nanmean(v[indices], axis=1)
    a = (1 - level) / 2
    lo, hi = np.nanquantile(means, [a, 1 - a])
    return float(np.nanmean(v)), float(lo), float(hi)


def bootstrap_stat_ci(
    stat: Callable[[np.ndarray], float],
    n: int,
    indices: np.ndarray,
    level: float = 0.95,
    floor: float | None = None,
) -> tuple[float, float, float]:
    """(value on all rows, low, high) for a set-level statistic stat(row_numbers): a bias-corrected
    percentile interval. Set statistics such as FD are biased upward on a resample (repeated rows
    shrink the spread), so the raw percentile interval can lie wholly above the estimate; the
    resampled values are shifted by their mean bias (mean of resamples - estimate) before taking
    the percentiles. `floor` clips the bounds (FD >= 0)."""
    full = float(stat(np.arange(n)))
    values = np.array([_or_nan(stat, idx) for idx in indices], dtype=np.float64)
    values = values[np.isfinite(values)]  # resamples the statistic is undefined on
    if not len(values) or not math.isfinite(full):
        return full, float("nan"), float("nan")
    values -= values.mean() - full
    a = (1 - level) / 2
    lo, hi = (float(q) for q in np.quantile(values, [a, 1 - a]))
    if floor is not None:
        lo, hi = max(lo, floor), max(hi, floor)
    return full, lo, hi


def _or_nan(stat: Callable[[np.ndarray], float], rows: np.ndarray) -> float:
    try:
        return float(stat(rows))
    except MetricError:  # e.g. KID on a resample with a single distinct row
        return float("nan")
