"""Evaluation data: every image a method may return or be compared with, indexed [concept, style],
plus the evaluation users ("cases") and how to draw new ones for robustness curves.

Two sources share this interface:
    EmojiPrefs   the fixed manifest users of a split (val.jsonl / test.jsonl); the retrieval gallery is
                 the split's concepts; new users come from `emojiprefs.draw_user` with the manifest's
                 rules (targets from the split, histories from train + the split).
    procedural   the shapes x styles drawn in code (`pigeon.data.procedural`), for tests.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pigeon.evaluation.errors import EvaluationError
from pigeon.evaluation.metrics import content_mask


class EvalDataError(EvaluationError):
    """Evaluation data that cannot be used; the message names the value."""


@dataclass
class EvalCase:
    """One user: a history, a reference and the ground truth, as (concept, style) indices."""

    user_id: str
    style: int  # s_u
    history: list[tuple[int, int]]  # oldest first
    reference: tuple[int, int]
    target: tuple[int, int]  # (target concept, s_u)
    text: str
    noise_ratio: float
    ambiguous: bool = False


@dataclass
class EvalData:
    """Images (uint8 (C, K, S, S, 3)), optional coverage alpha (C, K, S, S), concept names, the
    retrieval gallery (concept indices) and the cases of the chosen split."""

    name: str
    styles: list[str]
    concept_names: list[str]
    rgb: np.ndarray
    alpha: np.ndarray | None
    gallery: np.ndarray
    cases: list[EvalCase]
    split: str
    content_hash: str | None = None
    root: str | None = None
    # (rng, n, history_length, noise_ratio) -> new cases (robustness curves)
    draw: Callable[[np.random.Generator, int, int, float], list[EvalCase]] | None = field(
        default=None, repr=False
    )

    @property
    def size(self) -> int:
        return int(self.rgb.shape[2])

    def image(self, pair: tuple[int, int]) -> np.ndarray:
        return self.rgb[pair[0], pair[1]]

    def images(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """uint8 (len(pairs), S, S, 3)."""
        idx = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        return self.rgb[idx[:, 0], idx[:, 1]]

    def history(self, case: EvalCase) -> np.ndarray:
        return self.images(case.history)

    def truth(self, cases: list[EvalCase]) -> np.ndarray:
        return self.images([c.target for c in cases])

    def coverage(self, cases: list[EvalCase]) -> np.ndarray:
        """The ground truth's coverage in [0, 1], (N, S, S): alpha when built, else non-white."""
        if self.alpha is not None:
            idx = np.asarray([c.target for c in cases], dtype=np.int64).reshape(-1, 2)
            return self.alpha[idx[:, 0], idx[:, 1]].astype(np.float64) / 255.0
        return content_mask(self.truth(cases))

    def redraw(self, n: int, history_length: int, noise_ratio: float, seed: int) -> list[EvalCase]:
        """`n` new users with the given history length and noise ratio; the same arguments give
        the same users."""
        if self.draw is None:
            raise EvalDataError(f"{self.name}: cannot draw new users")
        rng = np.random.default_rng([seed, history_length, int(round(noise_ratio * 1000))])
        return self.draw(rng, n, history_length, noise_ratio)


def load_eval_data(
    source: str | Path,
    split: str = "test",
    limit: int | None = None,
    *,
    size: int = 64,
    procedural_users: int = 64,
    seed: int = 0,
) -> EvalData:
    """'procedural', or an EmojiPrefs folder with `<split>.jsonl`; `limit` keeps the first users."""
    if limit is not None and limit < 1:
        raise EvalDataError(f"limit={limit} must be >= 1")
    if str(source) == "procedural":
        data = procedural_data(size, procedural_users, seed)
    else:
        data = emojiprefs_data(Path(source), split)
    if limit is not None:
        data.cases = data.cases[:limit]
    return data


def emojiprefs_data(root: Path, split: str) -> EvalData:
    from pigeon.data import emojiprefs as E

    if split not in ("val", "test"):
        raise EvalDataError(f"split={split!r} must be 'val' or 'test' (train users are unlimited)")
    if not (root / "concepts.json").is_file():
        raise EvalDataError(
            f"--data {str(root)!r} is not an EmojiPrefs folder (no concepts.json); build one with "
            "`pigeon data emojiprefs --out DIR`"
        )
    ds = E.load_emojiprefs(root)
    manifest = root / f"{split}.jsonl"
    if not manifest.is_file():
        raise EvalDataError(f"{manifest}: not found")
    style_of = ds.style_index

    def convert(u: E.EmojiUser) -> EvalCase:
        try:
            return EvalCase(
                u.user_id,
                style_of[u.style],
                [ds.index(*h) for h in u.history],
                ds.index(*u.reference),
                ds.index(*u.target),
                u.text,
                u.noise_ratio,
                u.ambiguous,
            )
        except KeyError as exc:
            raise EvalDataError(f"{manifest}: user {u.user_id}: {exc}") from None

    cases = [convert(u) for u in E.load_manifest(manifest)]
    targets = ds.split_index[split]
    pool = sorted(ds.split_index["train"] + targets)

    def draw(rng: np.random.Generator, n: int, length: int, noise: float) -> list[EvalCase]:
        return [
            convert(
                E.draw_user(
                    rng,
                    f"{split}-L{length}-r{noise:g}-{i:05d}",
                    ds.concepts,
                    ds.styles,
                    targets,
                    pool,
                    length,
                    noise,
                )
            )
            for i in range(n)
        ]

    info = root / "dataset.json"
    digest = json.loads(info.read_text()).get("content_sha256") if info.is_file() else None
    return EvalData(
        name="emojiprefs",
        styles=list(ds.styles),
        concept_names=[c.name for c in ds.concepts],
        rgb=ds.rgb,
        alpha=ds.alpha,
        gallery=np.asarray(targets),
        cases=cases,
        split=split,
        content_hash=digest,
        root=str(root),
        draw=draw,
    )


def procedural_data(size: int = 64, users: int = 64, seed: int = 0) -> EvalData:
    """The procedural shapes; every concept is in the gallery (there is no concept split)."""
    from pigeon.data import procedural as P

    concepts, styles = list(P.CONCEPTS), list(P.STYLES)
    rgb = np.stack([np.stack([P.render(c, s, size) for s in styles]) for c in concepts])
    ci = {c: i for i, c in enumerate(concepts)}
    si = {s: i for i, s in enumerate(styles)}

    def draw(rng: np.random.Generator, n: int, length: int, noise: float) -> list[EvalCase]:
        out = []
        for i in range(n):
            u = P.sample_user(rng, length, noise)
            counts = np.bincount([si[s] for _, s in u.history], minlength=len(styles))
            own = si[u.style]
            out.append(
                EvalCase(
                    f"procedural-{i:05d}",
                    own,
                    [(ci[c], si[s]) for c, s in u.history],
                    (ci[u.reference[0]], si[u.reference[1]]),
                    (ci[u.target[0]], si[u.target[1]]),
                    u.text,
                    noise,
                    bool(counts[own] <= np.delete(counts, own).max()),
                )
            )
        return out

    digest = f"procedural-{size}-{zlib.crc32(rgb.tobytes()):08x}"
    return EvalData(
        name="procedural",
        styles=styles,
        concept_names=concepts,
        rgb=rgb,
        alpha=None,
        gallery=np.arange(len(concepts)),
        cases=draw(np.random.default_rng([seed, 5, 200]), users, 5, 0.2),
        split="test",
        content_hash=digest,
        root="procedural",
        draw=draw,
    )
