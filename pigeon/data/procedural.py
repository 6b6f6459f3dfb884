"""A tiny procedural dataset drawn in code: a few shapes x a few visual styles, no network needed.

Each (concept, style) pair is one deterministic RGB image on white, like an EmojiPrefs sticker. A user
prefers one style; their history shows other concepts, each in the preferred style with probability
1 - noise_ratio; the reference shows the target concept in another style; the ground truth is the
target concept in the preferred style.

    >>> img = render("circle", "outline", 32)
    >>> img.shape, img.dtype
    ((32, 32, 3), dtype('uint8'))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CONCEPTS = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {  # one colour per concept keeps the concept recognisable across styles
    "circle": (230, 60, 50),
    "square": (40, 120, 220),
    "triangle": (40, 170, 80),
    "diamond": (240, 180, 30),
    "cross": (150, 60, 200),
    "ring": (240, 120, 40),
}
STYLES = ("flat", "outline", "shaded", "pixel")
SUPERSAMPLE = 4


def _polygon(concept: str, s: float) -> list[tuple[float, float]] | None:
    c, r = s / 2, s * 0.34
    if concept == "square":
        return [(c - r, c - r), (c + r, c - r), (c + r, c + r), (c - r, c + r)]
    if concept == "triangle":
        return [(c, c - r), (c + r, c + r * 0.8), (c - r, c + r * 0.8)]
    if concept == "diamond":
        return [(c, c - r), (c + r, c), (c, c + r), (c - r, c)]
    if concept == "cross":
        w = r * 0.38
        return [
            (c - w, c - r),
            (c + w, c - r),
            (c + w, c - w),
            (c + r, c - w),
            (c + r, c + w),
            (c + w, c + w),
            (c + w, c + r),
            (c - w, c + r),
            (c - w, c + w),
            (c - r, c + w),
            (c - r, c - w),
            (c - w, c - w),
        ]
    return None


def _mask(concept: str, size: int) -> Image.Image:
    s = size * SUPERSAMPLE
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    c, r = s / 2, s * 0.34
    poly = _polygon(concept, s)
    if poly:
        draw.polygon(poly, fill=255)
    else:
        draw.ellipse((c - r, c - r, c + r, c + r), fill=255)
        if concept == "ring":
            draw.ellipse((c - r / 2, c - r / 2, c + r / 2, c + r / 2), fill=0)
    return mask


def render(concept: str, style: str, size: int) -> np.ndarray:
    """uint8 (size, size, 3): `concept` drawn in `style` on white."""
    if concept not in COLOURS:
        raise ValueError(f"unknown concept {concept!r}; known: {list(CONCEPTS)}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {list(STYLES)}")
    s = size * SUPERSAMPLE
    mask = _mask(concept, size)
    colour = np.array(COLOURS[concept], dtype=np.float32)
    canvas = np.full((s, s, 3), 255.0, dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    if style == "flat":
        canvas = canvas * (1 - m) + colour * m
    elif style == "outline":  # black line art, no fill
        edge = (
            np.asarray(
                mask.filter(ImageFilter.FIND_EDGES).filter(
                    ImageFilter.MaxFilter(2 * SUPERSAMPLE + 1)
                ),
                dtype=np.float32,
            )[..., None]
            / 255.0
        )
        canvas = canvas * (1 - edge)
    elif style == "shaded":  # a light-to-dark diagonal gradient with a dark rim
        yy, xx = np.mgrid[:s, :s] / s
        light = (1.3 - 0.8 * (xx + yy) / 2)[..., None]
        rim = (
            np.asarray(
                mask.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(SUPERSAMPLE + 1)),
                dtype=np.float32,
            )[..., None]
            / 255.0
        )
        body = np.clip(colour * light, 0, 255) * (1 - rim) + 0.4 * colour * rim
        canvas = canvas * (1 - m) + body * m
    image = Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BOX
    )
    if style == "pixel":  # flat colour on a coarse grid
        flat = render(concept, "flat", size)
        cells = max(2, size // 8)
        image = (
            Image.fromarray(flat)
            .resize((cells, cells), Image.Resampling.NEAREST)
            .resize((size, size), Image.Resampling.NEAREST)
        )
    return np.asarray(image, dtype=np.uint8)


@dataclass
class User:
    style: str
    history: list[tuple[str, str]]  # (concept, style), oldest first
    reference: tuple[str, str]
    target: tuple[str, str]  # the ground truth: target concept in the preferred style
    text: str


def sample_user(
    rng: np.random.Generator, history_length: int = 5, noise_ratio: float = 0.2
) -> User:
    """A synthetic user: preferred style, a noisy history, a reference in another style."""
    style = str(rng.choice(STYLES))
    target = str(rng.choice(CONCEPTS))
    others = [c for c in CONCEPTS if c != target]
    history = []
    for _ in range(history_length):
        concept = str(rng.choice(others))
        shown = (
            style
            if rng.random() >= noise_ratio
            else str(rng.choice([s for s in STYLES if s != style]))
        )
        history.append((concept, shown))
    ref_style = str(rng.choice([s for s in STYLES if s != style]))
    return User(style, history, (target, ref_style), (target, style), f"a {target}")


def sample_sequence(
    rng: np.random.Generator, length: int, noise_ratio: float = 0.2
) -> tuple[str, list[tuple[str, str]]]:
    """A synthetic interaction log: (preferred style, [(concept, style)] oldest first), each item in
    the preferred style with probability 1 - noise_ratio; for the user-data format
    (`pigeon.data.user_data.write_procedural_user_data`)."""
    style = str(rng.choice(STYLES))
    items = []
    for _ in range(length):
        shown = (
            style
            if rng.random() >= noise_ratio
            else str(rng.choice([s for s in STYLES if s != style]))
        )
        items.append((str(rng.choice(CONCEPTS)), shown))
    return style, items
