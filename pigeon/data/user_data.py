"""A user's own data: image files plus interaction logs, turned into Pigeon windows.

Folder layout (all JSON Lines, UTF-8, one object a line; blank lines are ignored):

    <root>/items.jsonl         {"item": "a1", "image": "images/a1.png", "caption": "a cat waving",
                                "emotion": "happy", "title": "..."}       (emotion, title optional)
    <root>/interactions.jsonl  {"user": "u1", "item": "a1", "time": 1700000000, "group": "cats"}
                               time: a number (e.g. POSIX seconds) or an ISO 8601 string; group optional
    <root>/users.jsonl         optional {"user": "u1", ...}: when present, other users are unknown
    <root>/images/...          the image files; `image` paths are relative to <root>

Each (user, group) sequence is ordered by time (ties keep file order) and cut with a sliding window of
`history_length + 1` items, stride 1: the first `history_length` are the history, the last is the
target (the Pigeon code: history 5, target 1). Windows are split 8:1:1 into train/val/test, either at
random with a seed (`split="random"`, as the paper's 8:1:1 window split) or by target time
(`split="temporal"`).

Bad rows (malformed JSON, missing fields, missing or unreadable image, duplicate or unknown user or
item, bad time, a sequence too short for one window) are reported with file and line number. With
`on_error="skip"` they are left out and listed in `UserData.report`; with `on_error="raise"` a
`UserDataError` lists all of them. Every interaction row ends up either in a window or in the report.

    >>> data = load_user_data("my_stickers", history_length=5)           # doctest: +SKIP
    >>> for problem in data.report: print(problem)                       # doctest: +SKIP
    >>> w = data.splits["train"][0]; images = [data.image(i) for i in w.history]  # doctest: +SKIP

`write_procedural_user_data` writes the procedural shapes in this format (`pigeon data procedural
--format user`): a small dataset of this kind that every training stage can run on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pigeon.files import write_atomic
from pigeon.core.images import ImageError, load_image, save_png

ITEMS_FILE = "items.jsonl"
INTERACTIONS_FILE = "interactions.jsonl"
USERS_FILE = "users.jsonl"
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
ON_ERROR = ("skip", "raise")
SPLIT_MODES = ("random", "temporal")


@dataclass(frozen=True)
class Problem:
    """One rejected row: where it is and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class UserDataError(ValueError):
    """Bad user data; `problems` lists every bad row when raised for rows."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            shown = "\n".join(f"  {p}" for p in self.problems[:50])
            more = len(self.problems) - 50
            message += "\n" + shown + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(message)


@dataclass(frozen=True)
class Item:
    item: str
    image: Path
    caption: str
    emotion: str | None = None
    title: str | None = None
    line: int = 0  # in items.jsonl


@dataclass(frozen=True)
class Interaction:
    user: str
    item: str
    time: float
    group: str
    line: int  # in interactions.jsonl


@dataclass(frozen=True)
class Window:
    """History items (oldest first) and the target item; `lines` are the interactions.jsonl lines."""

    user: str
    group: str
    history: tuple[str, ...]
    target: str
    time: float  # of the target
    lines: tuple[int, ...]


@dataclass
class UserData:
    root: Path
    items: dict[str, Item]
    splits: dict[str, list[Window]]
    report: list[Problem] = field(default_factory=list)
    history_length: int = 5

    def image(self, item: str) -> np.ndarray:
        """uint8 RGB (H, W, 3) of an item, transparency on white."""
        return load_image(self.items[item].image)

    def windows(self) -> list[Window]:
        return [w for s in SPLIT_FRACTIONS for w in self.splits[s]]

    def summary(self) -> dict:
        return {
            "items": len(self.items),
            "users": len({w.user for w in self.windows()}),
            "windows": {s: len(ws) for s, ws in self.splits.items()},
            "skipped_rows": len(self.report),
        }


def _lines(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object or None, error or None) for each non-blank line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserDataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            yield n, None, "not UTF-8 text"
            continue
        except json.JSONDecodeError as exc:
            yield n, None, f"malformed JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(obj, dict):
            yield n, None, f"expected a JSON object, got {type(obj).__name__}"
            continue
        yield n, obj, None


def _ident(obj: dict, key: str) -> tuple[str | None, str | None]:
    """A required id field (string or integer) -> (value, error)."""
    value = obj.get(key)
    if value is None:
        return None, f"missing field {key!r}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"field {key!r} must be a string or integer, got {type(value).__name__}"
    value = str(value)
    if not value.strip():
        return None, f"field {key!r} is empty"
    return value, None


def _optional_text(obj: dict, key: str) -> tuple[str | None, str | None]:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value, None
    return None, f"field {key!r} must be a string, got {type(value).__name__}"


def parse_time(value: object) -> float:
    """A number or an ISO 8601 string -> float seconds (naive dates count as UTC)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"bad time {value!r} (expected a number or an ISO 8601 date)")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"bad time {value!r} (not finite)")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        except ValueError:
            raise ValueError(
                f"bad time {value!r} (expected a number or an ISO 8601 date)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    raise ValueError(f"bad time {value!r} (expected a number or an ISO 8601 date)")


def _check_image(root: Path, rel: str, verify: bool) -> tuple[Path | None, str | None]:
    path = Path(rel)
    if path.is_absolute():
        return None, f"image path must be relative to the data folder, got {rel!r}"
    full = (root / path).resolve()
    if not full.is_relative_to(root.resolve()):
        return None, f"image path {rel!r} leaves the data folder"
    if not full.is_file():
        return None, f"image not found: {rel}"
    if verify:
        try:
            load_image(full, rel)
        except ImageError as exc:
            return None, f"unreadable image: {exc}"
    return full, None


def _read_items(
    root: Path, verify_images: bool, problems: list[Problem]
) -> tuple[dict[str, Item], dict[str, str]]:
    """-> (good items, {rejected item id: why})."""
    items: dict[str, Item] = {}
    rejected: dict[str, str] = {}
    for n, obj, error in _lines(root / ITEMS_FILE):
        item = None
        if error is None:
            item, error = _ident(obj, "item")
        if error is None and item in items:
            error = f"duplicate item {item!r} (first on line {items[item].line})"
        if error is None:
            image = obj.get("image")
            if not isinstance(image, str) or not image.strip():
                error = "missing field 'image'" if image is None else "field 'image' must be a path"
        if error is None and not isinstance(obj.get("caption"), str):
            error = (
                "missing field 'caption'"
                if obj.get("caption") is None
                else "field 'caption' must be a string"
            )
        emotion = title = None
        if error is None:
            emotion, error = _optional_text(obj, "emotion")
        if error is None:
            title, error = _optional_text(obj, "title")
        path = None
        if error is None:
            path, error = _check_image(root, obj["image"], verify_images)
        if error is not None:
            problems.append(Problem(ITEMS_FILE, n, error))
            if item is not None and item not in items:
                rejected.setdefault(item, f"{ITEMS_FILE}:{n}: {error}")
            continue
        items[item] = Item(item, path, obj["caption"], emotion, title, n)
    for item in items:
        rejected.pop(item, None)  # a later duplicate of a good item does not reject it
    return items, rejected


def _read_users(root: Path, problems: list[Problem]) -> set[str] | None:
    path = root / USERS_FILE
    if not path.exists():
        return None
    users: dict[str, int] = {}
    for n, obj, error in _lines(path):
        user = None
        if error is None:
            user, error = _ident(obj, "user")
        if error is None and user in users:
            error = f"duplicate user {user!r} (first on line {users[user]})"
        if error is not None:
            problems.append(Problem(USERS_FILE, n, error))
            continue
        users[user] = n
    return set(users)


def _read_interactions(
    root: Path,
    items: dict[str, Item],
    rejected: dict[str, str],
    users: set[str] | None,
    problems: list[Problem],
) -> list[Interaction]:
    out = []
    for n, obj, error in _lines(root / INTERACTIONS_FILE):
        user = item = group = None
        when = 0.0
        if error is None:
            user, error = _ident(obj, "user")
        if error is None:
            item, error = _ident(obj, "item")
        if error is None and users is not None and user not in users:
            error = f"unknown user {user!r} (not in {USERS_FILE})"
        if error is None and item not in items:
            error = (
                f"item {item!r} was rejected ({rejected[item]})"
                if item in rejected
                else f"unknown item {item!r} (not in {ITEMS_FILE})"
            )
        if error is None:
            if "time" not in obj:
                error = "missing field 'time'"
            else:
                try:
                    when = parse_time(obj["time"])
                except ValueError as exc:
                    error = str(exc)
        if error is None:
            group, error = _optional_text(obj, "group")
        if error is not None:
            problems.append(Problem(INTERACTIONS_FILE, n, error))
            continue
        out.append(Interaction(user, item, when, group or "", n))
    return out


def make_windows(
    interactions: list[Interaction], history_length: int, problems: list[Problem]
) -> list[Window]:
    """Sliding windows (stride 1) over each (user, group) sequence ordered by (time, line)."""
    sequences: dict[tuple[str, str], list[Interaction]] = {}
    for row in interactions:
        sequences.setdefault((row.user, row.group), []).append(row)
    windows = []
    need = history_length + 1
    for (user, group), rows in sorted(sequences.items()):
        rows = sorted(rows, key=lambda r: (r.time, r.line))
        if len(rows) < need:
            where = f"user {user!r}" + (f" (group {group!r})" if group else "")
            for row in sorted(rows, key=lambda r: r.line):
                problems.append(
                    Problem(
                        INTERACTIONS_FILE,
                        row.line,
                        f"sequence too short: {where} has {len(rows)} usable interaction(s), "
                        f"needs at least {need} (history {history_length} + target)",
                    )
                )
            continue
        for t in range(history_length, len(rows)):
            part = rows[t - history_length : t + 1]
            windows.append(
                Window(
                    user,
                    group,
                    tuple(r.item for r in part[:-1]),
                    part[-1].item,
                    part[-1].time,
                    tuple(r.line for r in part),
                )
            )
    return windows


def split_windows(
    windows: list[Window], mode: str = "random", seed: int = 0
) -> dict[str, list[Window]]:
    """8:1:1 train/val/test: a seeded shuffle ("random") or by target time ("temporal")."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {mode!r}")
    n = len(windows)
    if mode == "random":
        order = np.random.default_rng(seed).permutation(n).tolist()
    else:
        order = sorted(range(n), key=lambda i: (windows[i].time, i))
    n_val = int(round(n * SPLIT_FRACTIONS["val"]))
    n_test = int(round(n * SPLIT_FRACTIONS["test"]))
    n_train = n - n_val - n_test
    return {
        "train": [windows[i] for i in order[:n_train]],
        "val": [windows[i] for i in order[n_train : n_train + n_val]],
        "test": [windows[i] for i in order[n_train + n_val :]],
    }


def load_user_data(
    root: str | Path,
    history_length: int = 5,
    on_error: str = "skip",
    split: str = "random",
    seed: int = 0,
    verify_images: bool = True,
) -> UserData:
    """Read a user-data folder (see the module docstring) into split windows plus a report."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
    if history_length < 1:
        raise ValueError(f"history_length must be >= 1, got {history_length}")
    root = Path(root)
    if not root.is_dir():
        raise UserDataError(f"{root}: not a folder")
    for name in (ITEMS_FILE, INTERACTIONS_FILE):
        if not (root / name).is_file():
            raise UserDataError(f"{root}: {name} is missing")
    problems: list[Problem] = []
    items, rejected = _read_items(root, verify_images, problems)
    users = _read_users(root, problems)
    interactions = _read_interactions(root, items, rejected, users, problems)
    windows = make_windows(interactions, history_length, problems)
    problems.sort(key=lambda p: (p.file, p.line))
    if problems and on_error == "raise":
        raise UserDataError(f"{root}: {len(problems)} bad row(s)", problems)
    if not windows:
        raise UserDataError(
            f"{root}: no (user, group) sequence has {history_length + 1} usable interactions",
            problems,
        )
    return UserData(root, items, split_windows(windows, split, seed), problems, history_length)


PROCEDURAL_START_TIME = 1_700_000_000  # POSIX seconds of every synthetic user's first interaction


def write_procedural_user_data(
    root: str | Path,
    users: int,
    sequence_length: int = 8,
    size: int = 32,
    noise_ratio: float = 0.2,
    seed: int = 0,
) -> dict:
    """The procedural shapes as a user-data folder: one item per (concept, style), each user's log
    from `procedural.sample_sequence`. Images first, items.jsonl next, interactions.jsonl last, each
    written atomically, so an interrupted write leaves a folder that `load_user_data` refuses.
    -> {"out", "items", "users", "interactions", "styles": {user: preferred style}}."""
    from pigeon.data import procedural

    if users < 1 or sequence_length < 2:
        raise ValueError(
            f"need users >= 1 and sequence_length >= 2, got users={users}, "
            f"sequence_length={sequence_length}"
        )
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for concept in procedural.CONCEPTS:
        for style in procedural.STYLES:
            item = f"{concept}-{style}"
            save_png(procedural.render(concept, style, size), root / "images" / f"{item}.png")
            items.append({"item": item, "image": f"images/{item}.png", "caption": f"a {concept}"})
    rng = np.random.default_rng(seed)
    interactions, styles = [], {}
    for u in range(users):
        user = f"user{u}"
        styles[user], log = procedural.sample_sequence(rng, sequence_length, noise_ratio)
        for i, (concept, style) in enumerate(log):
            interactions.append(
                {"user": user, "item": f"{concept}-{style}", "time": PROCEDURAL_START_TIME + 60 * i}
            )
    write_atomic(root / ITEMS_FILE, "".join(json.dumps(r) + "\n" for r in items))
    write_atomic(root / INTERACTIONS_FILE, "".join(json.dumps(r) + "\n" for r in interactions))
    return {
        "out": str(root),
        "items": len(items),
        "users": users,
        "interactions": len(interactions),
        "styles": styles,
    }
