"""Training data behind one interface, drawn from a seeded generator so a step's batch can be re-made.

    TrainingData.images(rng, n)            -> uint8 (n, S, S, 3), captions       stages vae, image, lmm
    TrainingData.labelled_images(rng, n)   -> the same draw, and its style labels (None: none)
    TrainingData.users(rng, n, L, noise)   -> [User(history, reference, target, text)]  stages sft, dpo
    TrainingData.validation_users(n, L)    -> the same fixed users every time
    TrainingData.style_names               -> the style labels its users carry (empty: none)

Sources: the procedural shapes (`procedural`, no files), an EmojiPrefs build folder, or a folder in the
user-data format (`pigeon.data.user_data`: items.jsonl + interactions.jsonl + images). A batch for step k
comes from `np.random.default_rng([seed, k])`, so resuming at step k needs no data-loader state, and
every rank of a distributed run makes the same global batch and takes its own slice.

`paired_reference` says whether a source has a reference image apart from the target (the target's
concept in another style: procedural, EmojiPrefs). User data has none; there the reference is the
target itself, as in the paper's official code, where the 6th item of a window is both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pigeon.core.images import resize


@dataclass
class User:
    history: list[np.ndarray]  # uint8 (S, S, 3), oldest first
    reference: np.ndarray  # the target concept in another style
    target: np.ndarray  # the ground truth: the target concept in the user's style
    text: str
    # style labels (indices into the source's `style_names`) where the source has them
    history_styles: list[int] | None = None
    target_style: int | None = None


class ProceduralData:
    """The shapes x styles drawn in code (`pigeon.data.procedural`)."""

    name = "procedural"
    paired_reference = True

    def __init__(self, size: int) -> None:
        from pigeon.data import procedural

        self.size = size
        self.p = procedural
        self.style_names = tuple(procedural.STYLES)
        self.cache = {
            (c, s): procedural.render(c, s, size)
            for c in procedural.CONCEPTS
            for s in procedural.STYLES
        }

    def images(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        return self.labelled_images(rng, n)[:2]

    def labelled_images(
        self, rng: np.random.Generator, n: int
    ) -> tuple[np.ndarray, list[str], np.ndarray]:
        picks = [
            (str(rng.choice(self.p.CONCEPTS)), str(rng.choice(self.p.STYLES))) for _ in range(n)
        ]
        return (
            np.stack([self.cache[p] for p in picks]),
            [f"a {c}" for c, _ in picks],
            np.array([self.style_names.index(s) for _, s in picks]),
        )

    def users(
        self, rng: np.random.Generator, n: int, history_length: int, noise_ratio: float
    ) -> list[User]:
        out = []
        for _ in range(n):
            u = self.p.sample_user(rng, history_length, noise_ratio)
            out.append(
                User(
                    [self.cache[h] for h in u.history],
                    self.cache[u.reference],
                    self.cache[u.target],
                    u.text,
                    [self.style_names.index(style) for _, style in u.history],
                    self.style_names.index(u.target[1]),
                )
            )
        return out

    def validation_users(self, n: int, history_length: int) -> list[User]:
        return self.users(np.random.default_rng(10_000), n, history_length, 0.2)


class EmojiPrefsData:
    """An EmojiPrefs build (`pigeon data emojiprefs`): train-split concepts for training users,
    the fixed `val.jsonl` users for validation."""

    name = "emojiprefs"
    paired_reference = True

    def __init__(self, root: str | Path, size: int) -> None:
        from pigeon.data import emojiprefs

        self.e = emojiprefs
        self.dataset = emojiprefs.load_emojiprefs(root)
        self.size = size
        self.root = Path(root)
        self.train = self.dataset.split_index["train"]
        self.style_names = tuple(self.dataset.styles)

    def _user(self, u) -> User:
        history, reference, target = self.dataset.user_images(u)
        styles = self.dataset.style_index
        return User(
            [resize(h, self.size) for h in history],
            resize(reference, self.size),
            resize(target, self.size),
            u.text,
            [styles[style] for _, style in u.history],
            styles[u.target[1]],
        )

    def images(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        return self.labelled_images(rng, n)[:2]

    def labelled_images(
        self, rng: np.random.Generator, n: int
    ) -> tuple[np.ndarray, list[str], np.ndarray]:
        concepts = rng.choice(self.train, n)
        styles = rng.integers(0, len(self.dataset.styles), n)
        images = np.stack(
            [
                resize(self.dataset.rgb[c, s], self.size)
                for c, s in zip(concepts, styles, strict=True)
            ]
        )
        captions = [f"a sticker of {self.dataset.concepts[c].name}" for c in concepts]
        return images, captions, styles

    def users(
        self, rng: np.random.Generator, n: int, history_length: int, noise_ratio: float
    ) -> list[User]:
        return [
            self._user(self.e.sample_training_user(self.dataset, rng, history_length, noise_ratio))
            for _ in range(n)
        ]

    def validation_users(self, n: int, history_length: int) -> list[User]:
        users = self.e.load_manifest(self.root / "val.jsonl")[:n]
        return [self._user(u) for u in users]


class UserFormatData:
    """A user-data folder (`pigeon.data.user_data`): the train split's windows for training users,
    the val split's for validation, the train windows' items for the image stages. A window's last
    item is both the target and the reference; the log's own noise is the history's noise, so
    `noise_ratio` does not apply."""

    name = "user"
    paired_reference = False
    style_names: tuple[str, ...] = ()  # interaction logs carry no style labels

    def __init__(self, root: str | Path, size: int, history_length: int = 5) -> None:
        from pigeon.data.user_data import load_user_data

        self.data = load_user_data(root, history_length)
        self.size = size
        self.root = Path(root)
        self.train = self.data.splits["train"]
        if not self.train:
            raise ValueError(f"--data {str(root)!r}: the train split has no window")
        self.train_items = sorted({i for w in self.train for i in (*w.history, w.target)})
        self.cache: dict[str, np.ndarray] = {}

    def image(self, item: str) -> np.ndarray:
        if item not in self.cache:
            self.cache[item] = resize(self.data.image(item), self.size)
        return self.cache[item]

    def _user(self, window, history_length: int) -> User:
        if history_length > len(window.history):
            raise ValueError(
                f"history_length {history_length} is longer than the data's windows "
                f"({len(window.history)} history items)"
            )
        target = self.image(window.target)
        history = [self.image(i) for i in window.history[-history_length:]]
        return User(history, target, target, self.data.items[window.target].caption)

    def images(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        picks = [self.train_items[i] for i in rng.integers(0, len(self.train_items), n)]
        return (
            np.stack([self.image(i) for i in picks]),
            [self.data.items[i].caption for i in picks],
        )

    def labelled_images(
        self, rng: np.random.Generator, n: int
    ) -> tuple[np.ndarray, list[str], None]:
        return (*self.images(rng, n), None)

    def users(
        self, rng: np.random.Generator, n: int, history_length: int, noise_ratio: float
    ) -> list[User]:
        return [
            self._user(self.train[i], history_length) for i in rng.integers(0, len(self.train), n)
        ]

    def validation_users(self, n: int, history_length: int) -> list[User]:
        val = self.data.splits["val"]
        if not val:
            raise ValueError(f"--data {str(self.root)!r}: the val split has no window")
        return [self._user(val[i % len(val)], history_length) for i in range(n)]


TrainingData = ProceduralData | EmojiPrefsData | UserFormatData


def load_data(source: str, size: int) -> TrainingData:
    """`procedural`, an EmojiPrefs build folder, or a user-data folder."""
    from pigeon.data.user_data import INTERACTIONS_FILE, ITEMS_FILE

    if source == "procedural":
        return ProceduralData(size)
    path = Path(source)
    if (path / "concepts.json").is_file():
        return EmojiPrefsData(path, size)
    if (path / ITEMS_FILE).is_file() and (path / INTERACTIONS_FILE).is_file():
        return UserFormatData(path, size)
    raise ValueError(
        f"--data {source!r} is neither 'procedural', an EmojiPrefs folder (no concepts.json) nor "
        f"a user-data folder (no {ITEMS_FILE} + {INTERACTIONS_FILE}); build EmojiPrefs with "
        "`pigeon data emojiprefs --out DIR`"
    )
