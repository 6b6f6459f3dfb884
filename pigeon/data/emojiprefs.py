"""EmojiPrefs: the built-in dataset, the same emoji concepts drawn in several distinct open styles.

The build fetches pinned open emoji packages with `npm pack`
(tarballs kept in `cache_dir`, so a second build downloads nothing), renders the SVG sets with
`resvg-py`, takes the Fluent 3D raster set as it is, crops every image to its content and re-centres
it on a square with a small margin, joins the sets by codepoints (no flags, components or skin-tone
variants), splits concepts by gender-merged family, and writes fixed evaluation users.

Run (needs `npm` on PATH and the network, about a minute on 2 cores):

    python -m pigeon.data.emojiprefs --out data/emojiprefs [--size 64] [--permissive-only]

    >>> from pigeon.data.emojiprefs import build_emojiprefs, load_emojiprefs, sample_training_user
    >>> info = build_emojiprefs(Path("data/emojiprefs"))              # doctest: +SKIP
    >>> ds = load_emojiprefs("data/emojiprefs")                          # doctest: +SKIP
    >>> user = sample_training_user(ds, np.random.default_rng(0))        # doctest: +SKIP
    >>> history, reference, target = ds.user_images(user)                # doctest: +SKIP

Styles: `noto, twemoji, openmoji_color, openmoji_line, fluent_flat, fluent_3d, fluent_hc` by default
(7 clearly distinct styles); `fluent_color` (a vector look-alike of Fluent 3D, hard to tell apart at
64 px) only when asked for. `permissive_only=True` drops OpenMoji (CC BY-SA) and leaves 5 styles.
Apple and Facebook artwork is never fetched or used.

Layout of the output folder:

    images_<size>.npz   rgb:   uint8 (concepts, styles, size, size, 3), composited on white
                        alpha: uint8 (concepts, styles, size, size), the coverage mask (for masked metrics)
                        (np.load(...)["rgb"] loads everything into memory in about a second; index it
                        as rgb[concept_index, style_index])
    concepts.json       {"size", "styles": [...], "concepts": [{unified, name, tags, group, subgroup,
                        family, split}, ...]}; row i describes rgb[i]
    val.jsonl           fixed validation users (500 by default), one JSON object a line:
    test.jsonl          {user_id, s_u, noise_ratio, ambiguous, history: [{unified, style}],
                         instruction: {text, ref: {unified, style}}, target: {unified, style}}
    NOTICE              licence and attribution of every source used
    dataset.json        counts, sources (package, version, integrity), seed, build time and
                        content_sha256 (SHA-256 over the (unified, style)-sorted image bytes, then
                        concepts.json, val.jsonl and test.jsonl), so two builds can be compared

Users (design §6.2): preferred style s_u uniform over the styles; a history of L concepts (distinct,
never the target's family), each shown in s_u with probability 1 - noise_ratio and otherwise in a
uniformly random other style; a reference = the target concept in another style; the ground truth =
the target concept in s_u; text "a sticker of {name}". `ambiguous` marks histories where s_u is not
the strict plurality. Validation/test targets come from their own split, their history concepts from
train or their own split; training users (`sample_training_user`) use train concepts only.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pigeon.files import write_atomic
from pigeon.core.images import to_rgb

DEFAULT_STYLES = (
    "noto",
    "twemoji",
    "openmoji_color",
    "openmoji_line",
    "fluent_flat",
    "fluent_3d",
    "fluent_hc",
)
ALL_STYLES = DEFAULT_STYLES + ("fluent_color",)
SHARE_ALIKE_STYLES = ("openmoji_color", "openmoji_line")
PERMISSIVE_STYLES = tuple(s for s in DEFAULT_STYLES if s not in SHARE_ALIKE_STYLES)
SPLITS = ("test", "val", "train")
SPLIT_FRACTIONS = {"test": 0.2, "val": 0.1, "train": 0.7}
TEXT_TEMPLATE = "a sticker of {name}"
# Dropped before joining: emoji presentation/text selectors.
VARIATION_SELECTORS = frozenset({0xFE0E, 0xFE0F})
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
# Dropped to form families (design §4): man, woman, person, boy, girl, child, female/male signs, ZWJ.
GENDER_CODES = frozenset(
    {0x1F468, 0x1F469, 0x1F9D1, 0x1F466, 0x1F467, 0x1F9D2, 0x2640, 0x2642, 0x200D}
)
PERSON_FAMILY = (
    "PERSON"  # the family of sequences made only of the codes above (man, woman, family, ...)
)
EXCLUDED_GROUPS = frozenset({"flags", "component", "extras-openmoji", "extras-unicode"})
RENDER_SCALE = 2  # SVGs are rendered at RENDER_SCALE * size, then cropped and downscaled (LANCZOS)
ALPHA_THRESHOLD = 16  # alpha >= this counts as content for the crop box


class EmojiPrefsError(RuntimeError):
    """A build or load problem; the message names the package, file or value at fault."""


class EmptyImageError(EmojiPrefsError):
    """A source image with no visible content; the build drops that concept and records why."""


@dataclass(frozen=True)
class Source:
    """One pinned npm package and the licence of its artwork."""

    package: str
    version: str
    integrity: str  # npm's sha512 of the tarball
    licence: str
    notice: str

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def tarball(self) -> str:
        """The file name `npm pack` gives it (`@scope/name` -> `scope-name-<version>.tgz`)."""
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"


SOURCES = {
    s.package: s
    for s in (
        Source(
            "openmoji",
            "17.0.0",
            "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
            "CC-BY-SA-4.0",
            "OpenMoji 17.0.0 (styles openmoji_color, openmoji_line).\n"
            "All emojis designed by OpenMoji - the open-source emoji and icon project.\n"
            "License: CC BY-SA 4.0, https://creativecommons.org/licenses/by-sa/4.0/\n"
            "https://openmoji.org/ - ShareAlike: images in these styles (and plausibly model outputs\n"
            "in them) must be shared under CC BY-SA 4.0. Build with permissive_only=True to leave them out.",
        ),
        Source(
            "@iconify-json/noto",
            "1.2.9",
            "sha512-DQiuXENbun41ch+XPSV55H9FaWKpHTyz46YIKtSaKYD4fIDDzL1tR6H4np/T38jfrTAeI3rcKF0mqHYeZVAuaw==",
            "Apache-2.0",
            "Noto Emoji (style noto), Copyright Google Inc., via @iconify-json/noto 1.2.9.\n"
            "Licensed under the Apache License, Version 2.0, http://www.apache.org/licenses/LICENSE-2.0\n"
            "https://github.com/googlefonts/noto-emoji",
        ),
        Source(
            "@iconify-json/twemoji",
            "1.2.5",
            "sha512-uKpuIEV0v6K5BW3Mjdyl+XKFVAbbcPxAgifKvEMtZoUZB5+YiY5zaMm2uNNCxyXzAWU9yNLlj41WU6/mvgALsw==",
            "CC-BY-4.0",
            "Twemoji (style twemoji), Copyright Twitter, Inc. and other contributors (jdecked fork),\n"
            "via @iconify-json/twemoji 1.2.5. License: CC BY 4.0,\n"
            "https://creativecommons.org/licenses/by/4.0/ - https://github.com/jdecked/twemoji",
        ),
        Source(
            "@iconify-json/fluent-emoji-flat",
            "1.2.6",
            "sha512-RY47RgPb47fYUiyrA64sIOL0+UU02s29sXpNBbIQRBUlPlfNFTKUmZDERGuxDs/7yNGWqQYvuaSYM1M4fRXlUw==",
            "MIT",
            "Fluent Emoji Flat (style fluent_flat), Copyright (c) Microsoft Corporation,\n"
            "via @iconify-json/fluent-emoji-flat 1.2.6. License: MIT (text below).\n"
            "https://github.com/microsoft/fluentui-emoji",
        ),
        Source(
            "@iconify-json/fluent-emoji",
            "1.2.7",
            "sha512-D8G6bKAyIsyxP1rzZtIWr/gg/fO4Rg1+DyCWlfqKK4h8W+4Em/Y0P6QYgJUQTlUcagzJvSyg+9OBv4hz4Hc/QA==",
            "MIT",
            "Fluent Emoji Color (style fluent_color), Copyright (c) Microsoft Corporation,\n"
            "via @iconify-json/fluent-emoji 1.2.7. License: MIT (text below).\n"
            "https://github.com/microsoft/fluentui-emoji",
        ),
        Source(
            "@iconify-json/fluent-emoji-high-contrast",
            "1.2.6",
            "sha512-esqhZPpkrF7sNX3NsLoh8KW64okEr/bzko7WNnFP+qTJGAqDPDYjp0925yxuivXy3HtVQB8xhIKu3+Nq1byX5w==",
            "MIT",
            "Fluent Emoji High Contrast (style fluent_hc), Copyright (c) Microsoft Corporation,\n"
            "via @iconify-json/fluent-emoji-high-contrast 1.2.6. License: MIT (text below).\n"
            "https://github.com/microsoft/fluentui-emoji",
        ),
        Source(
            "@lobehub/fluent-emoji-3d",
            "1.1.0",
            "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==",
            "MIT",
            "Fluent Emoji 3D (style fluent_3d), Copyright (c) Microsoft Corporation; packaged as WebP\n"
            "by LobeHub (@lobehub/fluent-emoji-3d 1.1.0, Copyright (c) 2023 LobeHub).\n"
            "License: MIT (text below).\n"
            "https://github.com/microsoft/fluentui-emoji - https://github.com/lobehub/fluent-emoji",
        ),
    )
}
METADATA_PACKAGE = "openmoji"  # data/openmoji.json: CLDR names, tags, groups and subgroups
STYLE_PACKAGES = {
    "noto": ("@iconify-json/noto",),
    "twemoji": ("@iconify-json/twemoji",),
    "openmoji_color": ("openmoji",),
    "openmoji_line": ("openmoji",),
    "fluent_flat": ("@iconify-json/fluent-emoji-flat",),
    "fluent_color": ("@iconify-json/fluent-emoji", "@iconify-json/fluent-emoji-flat"),
    "fluent_3d": ("@lobehub/fluent-emoji-3d",),
    "fluent_hc": ("@iconify-json/fluent-emoji-high-contrast",),
}
MIT_TEXT = """\
Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction, including
without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE
USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


# --- codepoints and concepts -------------------------------------------------------------------


def codepoint_key(code: str) -> tuple[int, ...]:
    """'1F600', '1f44d-1f3fb', '23-20e3', '0023-fe0f-20e3' -> codepoints without FE0E/FE0F."""
    parts = [p for p in re.split(r"[-_\s]+", code.strip()) if p]
    if not parts:
        raise ValueError(f"empty codepoint sequence: {code!r}")
    try:
        points = [int(p, 16) for p in parts]
    except ValueError:
        raise ValueError(f"not a hex codepoint sequence: {code!r}") from None
    if any(p < 0 or p > 0x10FFFF for p in points):
        raise ValueError(f"codepoint out of range in {code!r}")
    key = tuple(p for p in points if p not in VARIATION_SELECTORS)
    if not key:
        raise ValueError(f"only variation selectors in {code!r}")
    return key


def unified(key: Sequence[int]) -> str:
    """(0x1F600,) -> '1F600': upper-case hex, at least 4 digits, joined with '-'."""
    return "-".join(f"{p:04X}" for p in key)


def family_of(key: Sequence[int]) -> str:
    """The gender-merged family: the sequence without person/gender codes and ZWJ (design §4)."""
    rest = tuple(p for p in key if p not in GENDER_CODES)
    return unified(rest) if rest else PERSON_FAMILY


@dataclass
class Concept:
    """One emoji concept; `unified` is its id (codepoints without variation selectors)."""

    unified: str
    name: str
    group: str
    subgroup: str
    tags: list[str] = field(default_factory=list)
    family: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        if not self.family:
            self.family = family_of(codepoint_key(self.unified))

    @property
    def key(self) -> tuple[int, ...]:
        return codepoint_key(self.unified)


def concepts_from_openmoji(entries: Iterable[dict]) -> list[Concept]:
    """OpenMoji's data/openmoji.json -> base Unicode emoji: no flags, components, extras or skin tones."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for e in sorted(entries, key=lambda e: (e.get("order") or 0, e["hexcode"])):
        if e.get("group") in EXCLUDED_GROUPS or e.get("skintone"):
            continue
        key = codepoint_key(e["hexcode"])
        if key in seen or SKIN_TONES.intersection(key):
            continue
        seen.add(key)
        tags = [t.strip() for t in (e.get("tags") or "").split(",") if t.strip()]
        out.append(Concept(unified(key), e["annotation"], e["group"], e["subgroups"], tags))
    return out


def index_by_codepoints(codes: Iterable[tuple[str, str]]) -> dict[tuple[int, ...], str]:
    """(raw codepoint string, reference) pairs -> {normalized key: reference}.

    Codes that are not hex sequences (e.g. OpenMoji's extra icons) are ignored. When two raw codes
    normalize to the same key, the one that sorts first wins (deterministic).
    """
    out: dict[tuple[int, ...], str] = {}
    for raw, ref in sorted(codes):
        try:
            key = codepoint_key(raw)
        except ValueError:
            continue
        out.setdefault(key, ref)
    return out


def join_concepts(
    concepts: Sequence[Concept], sources: dict[str, dict[tuple[int, ...], str]]
) -> list[Concept]:
    """The concepts every style has an image for, in the metadata's order."""
    return [c for c in concepts if all(c.key in refs for refs in sources.values())]


# --- images -----------------------------------------------------------------------------------


def crop_and_centre(
    rgba: np.ndarray, size: int, padding: int | None = None, threshold: int = ALPHA_THRESHOLD
) -> np.ndarray:
    """uint8 RGBA (H, W, 4) -> (size, size, 4): crop to the alpha box, fit the longer side into
    `size - 2 * padding` (LANCZOS), centre on a transparent square. Padding defaults to size / 32."""
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 4) array, got {rgba.dtype} {rgba.shape}")
    pad = max(1, round(size / 32)) if padding is None else padding
    inner = size - 2 * pad
    if inner < 1:
        raise ValueError(f"size {size} leaves no room inside padding {pad}")
    ys, xs = np.nonzero(rgba[..., 3] >= threshold)
    if ys.size == 0:
        raise ValueError(f"image has no content (alpha < {threshold} everywhere)")
    crop = rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape[:2]
    scale = inner / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = Image.fromarray(np.ascontiguousarray(crop), "RGBA")
    if (nh, nw) != (h, w):
        image = image.resize((nw, nh), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(image, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 RGBA (H, W, 4) -> RGB (H, W, 3) composited on white."""
    return np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")), dtype=np.uint8)


def _decode_rgba(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGBA"), dtype=np.uint8)
    except OSError as exc:
        raise EmojiPrefsError(f"{name}: cannot decode image ({exc})") from None


def render_svg(svg: str, width: int, height: int, name: str = "svg") -> np.ndarray:
    """SVG text -> uint8 RGBA (height, width, 4) with resvg."""
    import resvg_py  # a build-time dependency only

    try:
        png = resvg_py.svg_to_bytes(
            svg_string=svg, width=width, height=height, skip_system_fonts=True
        )
    except BaseException as exc:  # resvg raises pyo3 panics, which are BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise EmojiPrefsError(f"{name}: resvg cannot render it ({exc})") from None
    return _decode_rgba(bytes(png), name)


@dataclass(frozen=True)
class IconifySet:
    """An Iconify JSON icon set (`icons.json`)."""

    data: dict

    def svg(self, name: str, px: int) -> tuple[str, int, int, tuple[bool, bool, int]]:
        """The icon as an SVG whose longer side is `px`, plus (hFlip, vFlip, quarter turns)."""
        icons, aliases = self.data["icons"], self.data.get("aliases", {})
        hflip = vflip = False
        rotate = 0
        seen = set()
        while name not in icons:
            alias = aliases.get(name)
            if alias is None or name in seen:
                raise EmojiPrefsError(f"iconify set {self.data.get('prefix')!r}: no icon {name!r}")
            seen.add(name)
            hflip ^= bool(alias.get("hFlip", False))
            vflip ^= bool(alias.get("vFlip", False))
            rotate += int(alias.get("rotate", 0))
            name = alias["parent"]
        icon = icons[name]
        hflip ^= bool(icon.get("hFlip", False))
        vflip ^= bool(icon.get("vFlip", False))
        rotate += int(icon.get("rotate", 0))
        w = float(icon.get("width", self.data.get("width", 16)))
        h = float(icon.get("height", self.data.get("height", 16)))
        left = icon.get("left", self.data.get("left", 0))
        top = icon.get("top", self.data.get("top", 0))
        pw, ph = (px, max(1, round(px * h / w))) if w >= h else (max(1, round(px * w / h)), px)
        svg = (
            '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {w:g} {h:g}" width="{pw}" height="{ph}">{icon["body"]}</svg>'
        )
        return svg, pw, ph, (hflip, vflip, rotate % 4)

    def render(self, name: str, px: int) -> np.ndarray:
        svg, pw, ph, (hflip, vflip, rotate) = self.svg(name, px)
        rgba = render_svg(svg, pw, ph, f"{self.data.get('prefix')}:{name}")
        if hflip:
            rgba = rgba[:, ::-1]
        if vflip:
            rgba = rgba[::-1]
        if rotate:
            rgba = np.rot90(rgba, k=-rotate)  # Iconify turns clockwise
        return np.ascontiguousarray(rgba)


# --- splits and users --------------------------------------------------------------------------


def split_families(
    concepts: Sequence[Concept], seed: int = 0, fractions: dict[str, float] | None = None
) -> dict[str, str]:
    """{family: split}, about 20/10/70 test/val/train of the families, stratified by subgroup.

    Subgroups are visited in a seeded random order; within each, families are permuted and the first
    ones go to test, then val, then train, with counts rounded cumulatively over all subgroups (so
    the totals match the fractions to within one family).
    """
    fractions = dict(SPLIT_FRACTIONS if fractions is None else fractions)
    if abs(sum(fractions.values()) - 1) > 1e-9 or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    subgroup_of: dict[str, str] = {}
    for c in sorted(concepts, key=lambda c: c.key):
        subgroup_of.setdefault(c.family, c.subgroup)
    by_subgroup: dict[str, list[str]] = {}
    for family, subgroup in sorted(subgroup_of.items()):
        by_subgroup.setdefault(subgroup, []).append(family)
    rng = np.random.default_rng(seed)
    names = list(fractions)
    out: dict[str, str] = {}
    done = 0
    assigned = dict.fromkeys(names, 0)
    for s in rng.permutation(sorted(by_subgroup)).tolist():
        families = [by_subgroup[s][i] for i in rng.permutation(len(by_subgroup[s]))]
        done += len(families)
        start = 0
        for i, name in enumerate(names):
            if i == len(names) - 1:
                count = len(families) - start
            else:
                cum = sum(fractions[n] for n in names[: i + 1])
                wanted = round(cum * done) - sum(assigned[n] for n in names[: i + 1])
                count = min(max(0, wanted), len(families) - start)
            for family in families[start : start + count]:
                out[family] = name
            assigned[name] += count
            start += count
    return out


def assign_splits(concepts: Sequence[Concept], seed: int = 0) -> list[Concept]:
    """Set `split` on every concept from `split_families`; returns the same list."""
    splits = split_families(concepts, seed)
    for c in concepts:
        c.split = splits[c.family]
    return list(concepts)


@dataclass
class EmojiUser:
    """A synthetic user: a noisy history in a preferred style, a reference and the ground truth."""

    user_id: str
    style: str  # s_u, the preferred style
    noise_ratio: float
    history: list[tuple[str, str]]  # (unified, style), oldest first
    reference: tuple[str, str]  # (target unified, a style other than s_u)
    target: tuple[str, str]  # (target unified, s_u): the ground truth
    text: str
    ambiguous: bool  # s_u is not the strict plurality of the history styles

    def to_json(self) -> dict:
        return {
            "user_id": self.user_id,
            "s_u": self.style,
            "noise_ratio": self.noise_ratio,
            "ambiguous": self.ambiguous,
            "history": [{"unified": u, "style": s} for u, s in self.history],
            "instruction": {
                "text": self.text,
                "ref": {"unified": self.reference[0], "style": self.reference[1]},
            },
            "target": {"unified": self.target[0], "style": self.target[1]},
        }

    @classmethod
    def from_json(cls, row: dict) -> EmojiUser:
        return cls(
            user_id=row["user_id"],
            style=row["s_u"],
            noise_ratio=float(row["noise_ratio"]),
            history=[(h["unified"], h["style"]) for h in row["history"]],
            reference=(row["instruction"]["ref"]["unified"], row["instruction"]["ref"]["style"]),
            target=(row["target"]["unified"], row["target"]["style"]),
            text=row["instruction"]["text"],
            ambiguous=bool(row["ambiguous"]),
        )


def _check_user_args(styles: Sequence[str], history_length: int, noise_ratio: float) -> None:
    if len(styles) < 2:
        raise ValueError(f"users need at least 2 styles, got {list(styles)}")
    if history_length < 1:
        raise ValueError(f"history_length must be >= 1, got {history_length}")
    if not 0.0 <= noise_ratio <= 1.0:
        raise ValueError(f"noise_ratio must be in [0, 1], got {noise_ratio}")


def draw_user(
    rng: np.random.Generator,
    user_id: str,
    concepts: Sequence[Concept],
    styles: Sequence[str],
    targets: Sequence[int],
    history_pool: Sequence[int],
    history_length: int = 5,
    noise_ratio: float = 0.2,
) -> EmojiUser:
    """One user: target from `targets`, history concepts (distinct) from `history_pool` minus the
    target's family; indices refer to `concepts`."""
    _check_user_args(styles, history_length, noise_ratio)
    if not targets:
        raise ValueError("no target concepts to draw from")
    style = int(rng.integers(len(styles)))
    others = [i for i in range(len(styles)) if i != style]
    target = concepts[targets[int(rng.integers(len(targets)))]]
    pool = [i for i in history_pool if concepts[i].family != target.family]
    if len(pool) < history_length:
        raise ValueError(
            f"history_length {history_length} exceeds the {len(pool)} concepts outside family "
            f"{target.family!r} available for histories"
        )
    chosen = rng.choice(len(pool), size=history_length, replace=False)
    history = []
    counts = np.zeros(len(styles), dtype=np.int64)
    for j in chosen.tolist():
        shown = style if rng.random() >= noise_ratio else others[int(rng.integers(len(others)))]
        counts[shown] += 1
        history.append((concepts[pool[j]].unified, styles[shown]))
    ref_style = others[int(rng.integers(len(others)))]
    rivals = np.delete(counts, style)
    return EmojiUser(
        user_id=user_id,
        style=styles[style],
        noise_ratio=float(noise_ratio),
        history=history,
        reference=(target.unified, styles[ref_style]),
        target=(target.unified, styles[style]),
        text=TEXT_TEMPLATE.format(name=target.name),
        ambiguous=bool(counts[style] <= rivals.max()),
    )


def make_manifest(
    concepts: Sequence[Concept],
    styles: Sequence[str],
    split: str,
    n_users: int,
    seed: int = 0,
    history_length: int = 5,
    noise_ratio: float = 0.2,
) -> list[dict]:
    """Fixed evaluation users for `split` ('val' or 'test') as JSON rows; the same seed gives the
    same rows. Targets come from the split; histories from train or the split."""
    if split not in ("val", "test"):
        raise ValueError(f"manifests are for 'val' or 'test', got {split!r}")
    targets = [i for i, c in enumerate(concepts) if c.split == split]
    pool = [i for i, c in enumerate(concepts) if c.split in ("train", split)]
    if not targets:
        raise ValueError(f"no concepts in split {split!r}")
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return [
        draw_user(
            rng, f"{split}-{i:05d}", concepts, styles, targets, pool, history_length, noise_ratio
        ).to_json()
        for i in range(n_users)
    ]


# --- the dataset in memory ---------------------------------------------------------------------


@dataclass
class EmojiPrefs:
    """Images indexed [concept, style] plus concept metadata; see the module docstring."""

    styles: list[str]
    concepts: list[Concept]
    rgb: np.ndarray  # uint8 (concepts, styles, size, size, 3)
    alpha: np.ndarray | None = None  # uint8 (concepts, styles, size, size)
    root: Path | None = None

    def __post_init__(self) -> None:
        want = (len(self.concepts), len(self.styles))
        if self.rgb.ndim != 5 or self.rgb.shape[:2] != want or self.rgb.shape[4] != 3:
            raise ValueError(
                f"rgb must be (concepts={want[0]}, styles={want[1]}, H, W, 3), got {self.rgb.shape}"
            )
        self.concept_index = {c.unified: i for i, c in enumerate(self.concepts)}
        self.style_index = {s: i for i, s in enumerate(self.styles)}
        self.split_index = {
            s: [i for i, c in enumerate(self.concepts) if c.split == s] for s in SPLITS
        }

    @property
    def size(self) -> int:
        return int(self.rgb.shape[2])

    def index(self, unified_code: str, style: str) -> tuple[int, int]:
        try:
            return self.concept_index[unified_code], self.style_index[style]
        except KeyError:
            raise KeyError(f"no image for concept {unified_code!r} in style {style!r}") from None

    def image(self, unified_code: str, style: str) -> np.ndarray:
        """uint8 (size, size, 3) on white."""
        return self.rgb[self.index(unified_code, style)]

    def images(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """uint8 (len(pairs), size, size, 3)."""
        idx = np.array([self.index(u, s) for u, s in pairs], dtype=np.int64).reshape(-1, 2)
        return self.rgb[idx[:, 0], idx[:, 1]]

    def user_images(self, user: EmojiUser) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(history (L, H, W, 3), reference (H, W, 3), ground truth (H, W, 3))."""
        return self.images(user.history), self.image(*user.reference), self.image(*user.target)


def sample_training_user(
    dataset: EmojiPrefs,
    rng: np.random.Generator,
    history_length: int = 5,
    noise_ratio: float | tuple[float, float] = 0.2,
) -> EmojiUser:
    """A training user drawn on the fly from train-split concepts only.

    `noise_ratio` is a probability, or a (low, high) range to draw one per user uniformly.
    """
    if isinstance(noise_ratio, tuple):
        low, high = noise_ratio
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(
                f"noise_ratio range must satisfy 0 <= low <= high <= 1, got {noise_ratio}"
            )
        noise_ratio = float(rng.uniform(low, high))
    train = dataset.split_index["train"]
    return draw_user(
        rng, "train", dataset.concepts, dataset.styles, train, train, history_length, noise_ratio
    )


def load_emojiprefs(root: str | Path, size: int | None = None) -> EmojiPrefs:
    """Load a built dataset folder (all images into memory)."""
    root = Path(root)
    meta_path = root / "concepts.json"
    if not meta_path.is_file():
        raise EmojiPrefsError(f"{root}: no concepts.json; build it with build_emojiprefs first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        size = size or int(meta["size"])
        styles, concepts = list(meta["styles"]), [Concept(**c) for c in meta["concepts"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EmojiPrefsError(f"{meta_path}: not a valid concepts file ({exc})") from None
    npz = root / f"images_{size}.npz"
    if not npz.is_file():
        raise EmojiPrefsError(
            f"{npz}: not found (built sizes: {sorted(p.name for p in root.glob('images_*.npz'))})"
        )
    try:
        with np.load(npz, allow_pickle=False) as data:
            rgb, alpha = data["rgb"], data["alpha"] if "alpha" in data else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # truncated or altered
        raise EmojiPrefsError(f"{npz}: unreadable ({exc.__class__.__name__}: {exc})") from None
    if rgb.dtype != np.uint8 or rgb.ndim != 5 or rgb.shape[:2] != (len(concepts), len(styles)):
        raise EmojiPrefsError(
            f"{npz}: rgb has dtype {rgb.dtype} and shape {rgb.shape}; expected uint8 "
            f"({len(concepts)}, {len(styles)}, {size}, {size}, 3) from concepts.json"
        )
    return EmojiPrefs(styles, concepts, rgb, alpha, root)


def load_manifest(path: str | Path) -> list[EmojiUser]:
    """val.jsonl / test.jsonl -> users."""
    path = Path(path)
    users = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        if raw.strip():
            try:
                users.append(EmojiUser.from_json(json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError as exc:
                raise EmojiPrefsError(
                    f"{path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at {exc.start})"
                ) from None
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise EmojiPrefsError(
                    f"{path}:{n}: bad manifest row ({exc.__class__.__name__}: {exc})"
                ) from None
    return users


# --- fetching ----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pigeon" / "emojiprefs"


def _integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def fetch_package(source: Source, cache_dir: Path) -> Path:
    """The package tarball in `cache_dir`, fetched with `npm pack` unless already there and intact."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / source.tarball
    if path.is_file() and _integrity(path) == source.integrity:
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiPrefsError(
            f"npm not found on PATH; it is needed to fetch {source.spec} (install Node.js/npm, "
            f"or put {source.tarball} into {cache_dir})"
        )
    path.unlink(missing_ok=True)
    try:
        proc = subprocess.run(
            [npm, "pack", source.spec, "--pack-destination", str(cache_dir), "--loglevel=error"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=cache_dir,
        )
    except subprocess.TimeoutExpired:
        raise EmojiPrefsError(f"npm pack {source.spec} timed out after 600 s") from None
    if proc.returncode != 0 or not path.is_file():
        lines = [
            ln.removeprefix("npm error").strip()
            for ln in (proc.stderr or proc.stdout or "").splitlines()
            if ln.strip() and not ln.lstrip().startswith("at ") and "npm error     " not in ln
        ]
        detail = " | ".join(ln for ln in lines[:4] if ln) or "no output"
        raise EmojiPrefsError(f"npm pack {source.spec} failed (exit {proc.returncode}): {detail}")
    got = _integrity(path)
    if got != source.integrity:
        raise EmojiPrefsError(
            f"{source.spec}: tarball {path} has integrity {got}, expected {source.integrity}"
        )
    return path


def read_tarball(path: Path, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """Regular files under `package/` whose relative name passes `keep`, read into memory."""
    out = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.split("/", 1)[1] if "/" in member.name else member.name
                if keep(name):
                    out[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise EmojiPrefsError(
            f"{path}: cannot read tarball ({exc}); delete it and rebuild"
        ) from None
    return out


def _json(files: dict[str, bytes], name: str, package: str) -> dict | list:
    if name not in files:
        raise EmojiPrefsError(f"{package}: {name} missing from the package")
    try:
        return json.loads(files[name])
    except json.JSONDecodeError as exc:
        raise EmojiPrefsError(f"{package}: {name} is not valid JSON ({exc})") from None


class _StyleSource:
    """Codepoint index and renderer of one style."""

    def __init__(self, style: str, files: dict[str, dict[str, bytes]]):
        self.style = style
        package = STYLE_PACKAGES[style][0]
        pkg = files[package]
        self.iconify: IconifySet | None = None
        self.members: dict[str, bytes] = {}
        if style in ("openmoji_color", "openmoji_line"):
            folder = "color/svg/" if style == "openmoji_color" else "black/svg/"
            self.members = {n: b for n, b in pkg.items() if n.startswith(folder)}
            self.refs = index_by_codepoints((Path(n).stem, n) for n in self.members)
        elif style == "fluent_3d":
            self.members = {n: b for n, b in pkg.items() if n.endswith(".webp")}
            self.refs = index_by_codepoints((Path(n).stem, n) for n in self.members)
        else:
            self.iconify = IconifySet(_json(pkg, "icons.json", package))
            chars_pkg = STYLE_PACKAGES[style][-1]  # fluent_color: names from the flat set
            chars = _json(files[chars_pkg], "chars.json", chars_pkg)
            self.refs = index_by_codepoints(chars.items())

    def render(self, key: tuple[int, ...], size: int) -> np.ndarray:
        """The concept as uint8 RGBA (size, size, 4), cropped and centred."""
        ref = self.refs[key]
        name = f"{self.style} {unified(key)} ({ref})"
        if self.iconify is not None:
            rgba = self.iconify.render(ref, RENDER_SCALE * size)
        elif self.style == "fluent_3d":
            rgba = _decode_rgba(self.members[ref], name)
        else:
            svg = self.members[ref].decode("utf-8")
            px = RENDER_SCALE * size
            rgba = render_svg(svg, px, px, name)
        if not (rgba[..., 3] >= ALPHA_THRESHOLD).any():
            raise EmptyImageError(f"{name}: no visible content")
        return crop_and_centre(rgba, size)


def _keep(package: str, styles: Sequence[str]) -> Callable[[str], bool]:
    if package == "openmoji":
        folders = tuple(
            f
            for s, f in (("openmoji_color", "color/svg/"), ("openmoji_line", "black/svg/"))
            if s in styles
        )
        return lambda n: n == "data/openmoji.json" or (n.endswith(".svg") and n.startswith(folders))
    if package == "@lobehub/fluent-emoji-3d":
        return lambda n: n.startswith("assets/") and n.endswith(".webp")
    return lambda n: n in ("icons.json", "chars.json")


# --- build -------------------------------------------------------------------------------------


def resolve_styles(styles: Sequence[str] | None, permissive_only: bool) -> list[str]:
    """Default or requested styles, checked."""
    if styles is None:
        return list(PERMISSIVE_STYLES if permissive_only else DEFAULT_STYLES)
    styles = list(styles)
    unknown = [s for s in styles if s not in ALL_STYLES]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; known: {list(ALL_STYLES)}")
    if len(set(styles)) != len(styles):
        raise ValueError(f"duplicate styles in {styles}")
    if len(styles) < 2:
        raise ValueError(f"need at least 2 styles, got {styles}")
    if permissive_only:
        bad = [s for s in styles if s in SHARE_ALIKE_STYLES]
        if bad:
            raise ValueError(f"permissive_only excludes the CC BY-SA style(s) {bad}")
    return styles


def content_hash(
    concepts: Sequence[Concept],
    styles: Sequence[str],
    rgb: np.ndarray,
    alpha: np.ndarray,
    files: dict[str, bytes],
) -> str:
    """SHA-256 over the images sorted by (unified, style), then the named files sorted by name."""
    h = hashlib.sha256()
    order = sorted(
        (c.unified, s, i, j) for i, c in enumerate(concepts) for j, s in enumerate(styles)
    )
    for code, style, i, j in order:
        h.update(f"{code}\t{style}\n".encode())
        h.update(np.ascontiguousarray(rgb[i, j]).tobytes())
        h.update(np.ascontiguousarray(alpha[i, j]).tobytes())
    for name in sorted(files):
        h.update(f"{name}\n".encode())
        h.update(files[name])
    return h.hexdigest()


def _notice(styles: Sequence[str], packages: Sequence[str]) -> str:
    lines = [
        "EmojiPrefs - third-party artwork and data",
        "=========================================",
        "",
        "The images in this folder were rendered from the open emoji sets below: SVGs rasterized",
        "with resvg, the Fluent 3D WebP files decoded; every image was then cropped to its content,",
        "rescaled, re-centred on a square and composited on white. Each image keeps the licence of",
        "its source set. Apple and Facebook emoji artwork is not used.",
        f"Styles in this build: {', '.join(styles)}.",
        "",
        "Concept names, tags, groups and subgroups come from data/openmoji.json in the openmoji npm",
        "package 17.0.0 (CLDR annotations, Unicode License v3, https://www.unicode.org/license.txt).",
        "",
    ]
    for package in packages:
        source = SOURCES[package]
        if package == METADATA_PACKAGE and not set(SHARE_ALIKE_STYLES) & set(styles):
            lines += [
                f"--- {source.spec} (metadata only) ---",
                "Only data/openmoji.json is used (concept names and tags, see above); this build",
                "contains no OpenMoji artwork.",
                "",
            ]
            continue
        lines += [f"--- {source.spec} ({source.licence}) ---", source.notice, ""]
    if any(SOURCES[p].licence == "MIT" for p in packages):
        lines += [
            "--- MIT License (Fluent Emoji), Copyright (c) Microsoft Corporation ---",
            MIT_TEXT,
        ]
    return "\n".join(lines)


def _jsonl(rows: Sequence[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def build_emojiprefs(
    out: Path,
    size: int = 64,
    styles: list[str] | None = None,
    permissive_only: bool = False,
    cache_dir: Path | None = None,
    *,
    seed: int = 0,
    val_users: int = 500,
    test_users: int = 2000,
    history_length: int = 5,
    noise_ratio: float = 0.2,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Build EmojiPrefs into `out` (see the module docstring); returns what dataset.json holds."""
    start = time.perf_counter()
    say = log or (lambda _msg: None)
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    styles = resolve_styles(styles, permissive_only)
    out, cache_dir = Path(out), Path(cache_dir) if cache_dir else default_cache_dir()
    packages = [METADATA_PACKAGE] + [
        p for s in styles for p in STYLE_PACKAGES[s] if p != METADATA_PACKAGE
    ]
    packages = list(dict.fromkeys(packages))
    files: dict[str, dict[str, bytes]] = {}
    for package in packages:
        tarball = fetch_package(SOURCES[package], cache_dir)
        files[package] = read_tarball(tarball, _keep(package, styles))
    say(
        f"[emojiprefs] {len(packages)} packages ready in {cache_dir} ({time.perf_counter() - start:.1f} s)"
    )

    metadata = _json(files[METADATA_PACKAGE], "data/openmoji.json", METADATA_PACKAGE)
    sources = {s: _StyleSource(s, files) for s in styles}
    concepts = join_concepts(
        concepts_from_openmoji(metadata), {s: src.refs for s, src in sources.items()}
    )
    if not concepts:
        raise EmojiPrefsError(f"no concept has an image in every style of {styles}")
    say(
        f"[emojiprefs] {len(concepts)} concepts in all {len(styles)} styles; rendering at {size} px"
    )

    rgb = np.full((len(concepts), len(styles), size, size, 3), 255, dtype=np.uint8)
    alpha = np.zeros((len(concepts), len(styles), size, size), dtype=np.uint8)
    dropped: dict[str, str] = {}  # unified -> why (e.g. an empty SVG in one set)
    for j, style in enumerate(styles):
        t0 = time.perf_counter()
        for i, c in enumerate(concepts):
            try:
                rgba = sources[style].render(c.key, size)
            except EmptyImageError as exc:
                dropped.setdefault(c.unified, str(exc))
                continue
            rgb[i, j], alpha[i, j] = on_white(rgba), rgba[..., 3]
        say(f"[emojiprefs]   {style}: {time.perf_counter() - t0:.1f} s")
    del sources, files
    if dropped:
        keep = [i for i, c in enumerate(concepts) if c.unified not in dropped]
        concepts = [concepts[i] for i in keep]
        rgb, alpha = rgb[keep], alpha[keep]
        say(f"[emojiprefs] dropped {len(dropped)} concept(s): " + "; ".join(dropped.values()))

    import resvg_py

    info = write_dataset(
        out,
        concepts,
        styles,
        rgb,
        alpha,
        seed=seed,
        val_users=val_users,
        test_users=test_users,
        history_length=history_length,
        noise_ratio=noise_ratio,
        notice=_notice(styles, packages),
        extra={
            "permissive_only": permissive_only,
            "sources": [
                {
                    "package": p,
                    "version": SOURCES[p].version,
                    "integrity": SOURCES[p].integrity,
                    "licence": SOURCES[p].licence,
                }
                for p in packages
            ],
            "renderer": {
                "resvg_py": resvg_py.__version__,
                "pillow": Image.__version__,
                "render_scale": RENDER_SCALE,
                "alpha_threshold": ALPHA_THRESHOLD,
            },
            "dropped": dropped,
        },
    )
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    write_atomic(out / "dataset.json", (json.dumps(info, indent=1) + "\n").encode("utf-8"))
    say(f"[emojiprefs] wrote {out} in {info['build_seconds']} s; sha256 {info['content_sha256']}")
    return info


def write_dataset(
    out: Path,
    concepts: list[Concept],
    styles: Sequence[str],
    rgb: np.ndarray,
    alpha: np.ndarray,
    *,
    seed: int = 0,
    val_users: int = 500,
    test_users: int = 2000,
    history_length: int = 5,
    noise_ratio: float = 0.2,
    notice: str = "",
    extra: dict | None = None,
) -> dict:
    """Split `concepts` by family, write the images, concepts.json, manifests, NOTICE and
    dataset.json into `out`; returns dataset.json's content (with the content hash)."""
    styles = list(styles)
    size = int(rgb.shape[2])
    if rgb.shape != (len(concepts), len(styles), size, size, 3) or alpha.shape != rgb.shape[:4]:
        raise ValueError(
            f"rgb {rgb.shape} / alpha {alpha.shape} do not match {len(concepts)} concepts x "
            f"{len(styles)} styles of square images"
        )
    assign_splits(concepts, seed)
    args = (seed, history_length, noise_ratio)
    hashed = {
        "concepts.json": json.dumps(
            {"size": size, "styles": styles, "concepts": [asdict(c) for c in concepts]},
            ensure_ascii=False,
            indent=1,
        ).encode("utf-8"),
        "val.jsonl": _jsonl(make_manifest(concepts, styles, "val", val_users, *args)),
        "test.jsonl": _jsonl(make_manifest(concepts, styles, "test", test_users, *args)),
    }
    digest = content_hash(concepts, styles, rgb, alpha, hashed)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / f"images_{size}.npz"
    tmp = out / f".images_{size}.tmp.npz"
    np.savez_compressed(tmp, rgb=rgb, alpha=alpha)
    tmp.replace(npz)
    for name, data in hashed.items():
        write_atomic(out / name, data)
    if notice:
        write_atomic(out / "NOTICE", notice.encode("utf-8"))
    info = {
        "name": "EmojiPrefs",
        "format": 1,
        "size": size,
        "styles": styles,
        "seed": seed,
        "counts": {
            "concepts": len(concepts),
            "families": len({c.family for c in concepts}),
            "styles": len(styles),
            "images": len(concepts) * len(styles),
            "concepts_per_split": {s: sum(c.split == s for c in concepts) for s in SPLITS},
            "families_per_split": {
                s: len({c.family for c in concepts if c.split == s}) for s in SPLITS
            },
            "val_users": val_users,
            "test_users": test_users,
        },
        "users": {
            "history_length": history_length,
            "noise_ratio": noise_ratio,
            "text": TEXT_TEMPLATE,
        },
        "files": {
            "images": npz.name,
            "concepts": "concepts.json",
            "val": "val.jsonl",
            "test": "test.jsonl",
        },
        **(extra or {}),
        "content_sha256": digest,
        "npz_bytes": npz.stat().st_size,
    }
    write_atomic(out / "dataset.json", (json.dumps(info, indent=1) + "\n").encode("utf-8"))
    return info


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the EmojiPrefs dataset (needs npm).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--styles", nargs="+", choices=ALL_STYLES)
    parser.add_argument("--permissive-only", action="store_true")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_emojiprefs(
        args.out, args.size, args.styles, args.permissive_only, args.cache_dir, seed=args.seed
    )


if __name__ == "__main__":
    main()
