"""NumPy twin of `pigeon.models.mask_generator.select_keep` for every inference path.

Sequences for the mask generator: the kept tokens of each history image (type 1) then of the reference
(type 2), positions 1-based within each image, right-padded with type 0.
"""

from __future__ import annotations

import numpy as np

PAD_TYPE, HISTORY_TYPE, REFERENCE_TYPE = 0, 1, 2


def num_kept(n: int, mask_ratio: float) -> int:
    """k = max(1, int(n (1 - r)))."""
    return max(1, int(n * (1.0 - mask_ratio)))


def mask_sequence(
    history: list[np.ndarray], reference: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kept code ids per history image and for the reference -> token_ids, position_ids, type_ids (L,)."""
    runs = [(h, HISTORY_TYPE) for h in history] + [(reference, REFERENCE_TYPE)]
    ids = np.concatenate([r for r, _ in runs]).astype(np.int64)
    positions = np.concatenate([np.arange(1, len(r) + 1) for r, _ in runs]).astype(np.int64)
    types = np.concatenate([np.full(len(r), t) for r, t in runs]).astype(np.int64)
    return ids, positions, types


def pad_right(rows: list[np.ndarray], value: int = 0) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _log_softmax_masked(scores: np.ndarray, member: np.ndarray) -> np.ndarray:
    x = np.where(member, scores.astype(np.float64), -np.inf)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def select_keep(
    scores: np.ndarray,
    type_ids: np.ndarray,
    *,
    history_ratio: float,
    reference_ratio: float,
    training: bool = False,
    gumbel: np.ndarray | None = None,
) -> np.ndarray:
    """Keep decisions (batch, L) in {0, 1}: joint history Gumbel top-k and reference Gumbel top-k,
    high scores kept at inference (masked in training)."""
    keep = np.zeros(scores.shape, dtype=np.float32)
    for token_type, ratio in ((HISTORY_TYPE, history_ratio), (REFERENCE_TYPE, reference_ratio)):
        member = type_ids == token_type
        log_p = _log_softmax_masked(scores, member)
        if token_type == REFERENCE_TYPE and training:
            with np.errstate(divide="ignore", invalid="ignore"):
                logits = np.log1p(-np.minimum(np.exp(log_p), 1 - 1e-6))
        else:
            logits = log_p
        y = np.where(member, np.nan_to_num(logits) + (0.0 if gumbel is None else gumbel), -np.inf)
        rank = np.argsort(np.argsort(-y, axis=-1, kind="stable"), axis=-1, kind="stable")
        n = member.sum(axis=-1)
        k = np.array([num_kept(int(c), ratio) if c else 0 for c in n])
        keep += ((rank < k[:, None]) & member).astype(np.float32)
    return keep


def gumbel_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gumbel(0, 1) = -log(-log U)."""
    u = rng.uniform(np.finfo(np.float64).tiny, 1.0, shape)
    return -np.log(-np.log(u))
