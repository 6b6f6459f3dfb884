"""User data: windows of history N + target per user, the 8:1:1 split, and the bad-row report with
file and line numbers, on a small folder written by the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pigeon.core.images import save_png
from pigeon.data.user_data import (
    Problem,
    UserDataError,
    load_user_data,
    parse_time,
    split_windows,
    write_procedural_user_data,
)


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((12, 10, 4), 0, np.uint8)
    image[2:9, 2:8] = [*np.random.default_rng(seed).integers(0, 255, 3), 255]
    save_png(image, path)


def _jsonl(path: Path, rows: list) -> None:
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    for i in range(12):
        _png(root / "images" / f"i{i}.png", i)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _jsonl(
        root / "items.jsonl",
        [
            *[
                {"item": f"i{i}", "image": f"images/i{i}.png", "caption": f"sticker {i}"}
                for i in range(10)
            ],  # 1-10
            {
                "item": "i10",
                "image": "images/i10.png",
                "caption": "cat",
                "emotion": "happy",
                "title": "T",
            },  # 11
            '{"item": "oops", "image": ',  # 12: malformed JSON
            {"item": "gone", "image": "images/nothere.png", "caption": "x"},  # 13: missing image
            {"item": "broken", "image": "images/broken.png", "caption": "x"},  # 14: unreadable file
            {"item": "i3", "image": "images/i3.png", "caption": "again"},  # 15: duplicate item
            {"item": "nocap", "image": "images/i11.png"},  # 16: no caption
            "",  # 17: blank, ignored
            {"item": "escape", "image": "../outside.png", "caption": "x"},  # 18: leaves the folder
        ],
    )
    _jsonl(root / "users.jsonl", [{"user": "u1"}, {"user": "u2"}, {"user": "u3"}])
    u1 = [(f"i{k}", 100 + k) for k in range(9)]
    u2 = [(f"i{k}", 200 + t) for t, k in enumerate([9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 10])]
    # u1's rows are written out of time order: windows must follow time, not file order
    rows = [{"user": "u1", "item": it, "time": t} for it, t in reversed(u1)]  # lines 1-9
    rows += [{"user": "u2", "item": it, "time": t} for it, t in u2]  # lines 10-20
    rows += [{"user": "u3", "item": f"i{k}", "time": k} for k in range(3)]  # 21-23: too short
    rows += [
        {"user": "ghost", "item": "i0", "time": 1},  # 24: unknown user
        {"user": "u1", "item": "nosuch", "time": 1},  # 25: unknown item
        {"user": "u1", "item": "gone", "time": 1},  # 26: item rejected (missing image)
        "{not json}",  # 27: malformed
        {"user": "u2", "item": "i0", "time": "yesterday"},  # 28: bad time
        {"user": "u2", "item": "i0"},  # 29: no time
    ]
    _jsonl(root / "interactions.jsonl", rows)
    return root


EXPECTED = [
    ("interactions.jsonl", 21, "sequence too short: user 'u3' has 3"),
    ("interactions.jsonl", 22, "sequence too short"),
    ("interactions.jsonl", 23, "sequence too short"),
    ("interactions.jsonl", 24, "unknown user 'ghost'"),
    ("interactions.jsonl", 25, "unknown item 'nosuch'"),
    ("interactions.jsonl", 26, "item 'gone' was rejected (items.jsonl:13: image not found"),
    ("interactions.jsonl", 27, "malformed JSON"),
    ("interactions.jsonl", 28, "bad time 'yesterday'"),
    ("interactions.jsonl", 29, "missing field 'time'"),
    ("items.jsonl", 12, "malformed JSON"),
    ("items.jsonl", 13, "image not found: images/nothere.png"),
    ("items.jsonl", 14, "unreadable image"),
    ("items.jsonl", 15, "duplicate item 'i3' (first on line 4)"),
    ("items.jsonl", 16, "missing field 'caption'"),
    ("items.jsonl", 18, "leaves the data folder"),
]


def test_windows_follow_time_order(folder):
    data = load_user_data(folder, history_length=5)
    windows = sorted(data.windows(), key=lambda w: (w.user, w.time))
    u1 = [w for w in windows if w.user == "u1"]
    u2 = [w for w in windows if w.user == "u2"]
    assert len(u1) == 9 - 5 and len(u2) == 11 - 5
    assert u1[0].history == ("i0", "i1", "i2", "i3", "i4") and u1[0].target == "i5"
    assert u1[-1].history == ("i3", "i4", "i5", "i6", "i7") and u1[-1].target == "i8"
    assert u1[0].lines == (9, 8, 7, 6, 5, 4)  # u1 was written newest first
    assert u2[0].history == ("i9", "i8", "i7", "i6", "i5") and u2[0].target == "i4"
    assert u2[-1].target == "i10" and u2[-1].time == 210
    assert data.items["i10"].emotion == "happy" and data.items["i10"].title == "T"
    assert data.image("i10").shape == (12, 10, 3)


def test_split_8_1_1(folder):
    data = load_user_data(folder)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 8, "val": 1, "test": 1}
    ids = [(w.user, w.time) for s in ("train", "val", "test") for w in data.splits[s]]
    assert len(set(ids)) == 10
    again = load_user_data(folder)
    assert again.splits == data.splits  # same seed, same split
    other = load_user_data(folder, seed=5)
    assert sorted(ids) == sorted((w.user, w.time) for w in other.windows())
    temporal = load_user_data(folder, split="temporal")
    times = [[w.time for w in temporal.splits[s]] for s in ("train", "val", "test")]
    assert max(times[0]) <= min(times[1]) <= min(times[2])


def test_split_sizes_for_larger_sets():
    from pigeon.data.user_data import Window

    windows = [Window("u", "", ("a",), "b", float(i), (i,)) for i in range(95)]
    parts = split_windows(windows, "random", seed=0)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [75, 10, 10]
    assert sorted(w.time for s in parts for w in parts[s]) == [float(i) for i in range(95)]


def test_report_lists_every_bad_row_with_its_line(folder):
    data = load_user_data(folder, on_error="skip")
    got = [(p.file, p.line, p.reason) for p in data.report]
    assert [(f, n) for f, n, _ in got] == [(f, n) for f, n, _ in EXPECTED]
    for (_, _, reason), (_, _, expected) in zip(got, EXPECTED, strict=True):
        assert expected in reason, (reason, expected)
    assert str(data.report[0]).startswith("interactions.jsonl:21: sequence too short")
    # nothing silently dropped: every interaction line is in a window or in the report
    lines = {n for w in data.windows() for n in w.lines} | {
        p.line for p in data.report if p.file == "interactions.jsonl"
    }
    assert lines == set(range(1, 30))
    assert data.summary() == {
        "items": 11,
        "users": 2,
        "windows": {"train": 8, "val": 1, "test": 1},
        "skipped_rows": len(EXPECTED),
    }


def test_raise_mode_rejects_with_all_problems(folder):
    with pytest.raises(UserDataError) as info:
        load_user_data(folder, on_error="raise")
    assert len(info.value.problems) == len(EXPECTED)
    assert "items.jsonl:13: image not found" in str(info.value)
    assert "interactions.jsonl:24: unknown user 'ghost'" in str(info.value)


def test_clean_folder_raises_nothing(folder):
    _jsonl(
        folder / "items.jsonl",
        [{"item": f"i{i}", "image": f"images/i{i}.png", "caption": "c"} for i in range(6)],
    )
    _jsonl(
        folder / "interactions.jsonl",
        [{"user": "u1", "item": f"i{i}", "time": f"2024-01-0{i + 1}T00:00:00Z"} for i in range(6)],
    )
    data = load_user_data(folder, on_error="raise")
    assert data.report == [] and len(data.windows()) == 1
    assert data.windows()[0].history == ("i0", "i1", "i2", "i3", "i4")


def test_groups_make_separate_sequences(folder):
    _jsonl(
        folder / "items.jsonl",
        [{"item": f"i{i}", "image": f"images/i{i}.png", "caption": "c"} for i in range(4)],
    )
    rows = [{"user": "u1", "item": f"i{i % 4}", "time": i, "group": "a"} for i in range(4)]
    rows += [{"user": "u1", "item": f"i{i % 4}", "time": i, "group": "b"} for i in range(2)]
    _jsonl(folder / "interactions.jsonl", rows)
    data = load_user_data(folder, history_length=2)
    assert sorted((w.group, w.history, w.target) for w in data.windows()) == [
        ("a", ("i0", "i1"), "i2"),
        ("a", ("i1", "i2"), "i3"),
    ]
    assert [(p.line, "group 'b'" in p.reason) for p in data.report] == [(5, True), (6, True)]


def test_bad_arguments_and_missing_files(tmp_path, folder):
    with pytest.raises(ValueError, match="on_error"):
        load_user_data(folder, on_error="ignore")
    with pytest.raises(ValueError, match="split"):
        load_user_data(folder, split="by-user")
    with pytest.raises(UserDataError, match="not a folder"):
        load_user_data(tmp_path / "nope")
    (folder / "interactions.jsonl").unlink()
    with pytest.raises(UserDataError, match="interactions.jsonl is missing"):
        load_user_data(folder)


def test_parse_time():
    assert parse_time(5) == 5.0
    assert parse_time("12.5") == 12.5
    assert parse_time("1970-01-01T00:01:00Z") == 60.0
    assert parse_time("1970-01-01T01:00:00+01:00") == 0.0
    assert parse_time("1970-01-02") == 86400.0
    for bad in (True, None, "soon", float("nan"), [1]):
        with pytest.raises(ValueError, match="bad time"):
            parse_time(bad)


def test_problem_str():
    assert str(Problem("items.jsonl", 3, "x")) == "items.jsonl:3: x"


# --- the procedural shapes in this format, and the training source that reads it -----------------


def test_procedural_user_data_writes_the_drawn_shapes_in_time_order(tmp_path):
    from pigeon.data import procedural

    info = write_procedural_user_data(tmp_path, users=5, sequence_length=9, size=24, seed=3)
    data = load_user_data(tmp_path, history_length=5, on_error="raise")
    assert data.summary()["items"] == len(procedural.CONCEPTS) * len(procedural.STYLES)
    assert len(data.windows()) == 5 * (9 - 5)  # one window per interaction after the first five
    # the log replays procedural.sample_sequence with the same seed, user by user
    rng = np.random.default_rng(3)
    expected = {f"user{u}": procedural.sample_sequence(rng, 9, 0.2) for u in range(5)}
    assert info["styles"] == {u: style for u, (style, _) in expected.items()}
    for w in data.windows():
        log = [f"{c}-{s}" for c, s in expected[w.user][1]]
        assert [*w.history, w.target] in [log[i : i + 6] for i in range(len(log) - 5)]
    concept, style = data.windows()[0].target.split("-")
    np.testing.assert_array_equal(
        data.image(data.windows()[0].target), procedural.render(concept, style, 24)
    )
    assert data.items[data.windows()[0].target].caption == f"a {concept}"


def test_user_format_training_data_draws_train_windows_with_the_target_as_reference(tmp_path):
    from pigeon.core.images import resize
    from pigeon.training.data import UserFormatData, load_data

    write_procedural_user_data(tmp_path, users=6, sequence_length=8, size=24, seed=1)
    data = load_data(str(tmp_path), 16)
    assert isinstance(data, UserFormatData) and not data.paired_reference
    split = data.data.splits
    train_items = {i for w in split["train"] for i in (*w.history, w.target)}
    users = data.users(np.random.default_rng(0), 20, 3, noise_ratio=0.9)
    for u in users:
        assert u.reference is u.target and u.target.shape == (16, 16, 3) and len(u.history) == 3
        # every drawn user is one train window: its last three history items, target and caption
        match = [
            w
            for w in split["train"]
            if np.array_equal(u.target, resize(data.data.image(w.target), 16))
            and all(
                np.array_equal(h, resize(data.data.image(i), 16))
                for h, i in zip(u.history, w.history[-3:], strict=True)
            )
        ]
        assert match and u.text == data.data.items[match[0].target].caption
    images, captions = data.images(np.random.default_rng(0), 30)
    drawable = {data.data.items[i].caption for i in train_items}
    assert images.shape == (30, 16, 16, 3) and set(captions) <= drawable
    val = data.validation_users(len(split["val"]) + 1, 5)
    first = split["val"][0]
    np.testing.assert_array_equal(val[0].target, resize(data.data.image(first.target), 16))
    np.testing.assert_array_equal(val[-1].target, val[0].target)  # wraps round a short split
    with pytest.raises(ValueError, match="history_length 6 is longer"):
        data.users(np.random.default_rng(0), 1, 6, 0.0)


def test_user_data_evaluation_names_a_bad_request_field(tmp_path, capsys):
    """`pigeon evaluate --data USER_DATA --request KEY=VALUE` checks the key as the EmojiPrefs
    evaluation does, before anything is loaded."""
    from pigeon.cli import main

    write_procedural_user_data(tmp_path / "data", users=4, size=16)
    code = main(
        [
            "evaluate",
            "--data",
            str(tmp_path / "data"),
            "--checkpoint",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "out"),
            "--request",
            "nosuch=1",
        ]
    )
    assert code != 0
    assert "GenerationRequest has no field 'nosuch'" in capsys.readouterr().err
