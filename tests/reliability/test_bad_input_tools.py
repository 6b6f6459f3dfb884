"""Bad input to the CLI and the data tools: every bad image, number, text and data row is named."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ..conftest import emoji_like
from ..test_cli import pigeon
from ..test_serving import png
from .support import (
    ONE_PIXEL,
    ROOT,
    TIMEOUT_S,
    TRUNCATED,
    bomb,
    png_header,
)


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_images")
    files = {
        "zero.png": b"",
        "truncated.png": TRUNCATED,
        "bomb.png": bomb(),
        "claims_10gp.png": png_header(100_000, 100_000),
        "text.png": b"hello, not an image",
        "one.png": ONE_PIXEL,
        "good.png": png(emoji_like(1)),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    "image,message",
    [
        ("zero.png", "zero.png: not a readable image"),
        ("truncated.png", "truncated.png: "),
        ("bomb.png", "bomb.png: 5000x5000 pixels exceeds the limit"),
        ("claims_10gp.png", "claims_10gp.png: exceeds the limit"),
        ("text.png", "text.png: not a readable image"),
        ("missing.png", "missing.png: file not found"),
    ],
)
@pytest.mark.integration
def test_cli_generate_names_the_bad_image(tmp_path, bad_images, image, message):
    res = pigeon(
        "generate",
        "--checkpoint",
        str(tmp_path),
        "--history",
        str(bad_images / "good.png"),
        str(bad_images / image),
        "--reference",
        str(bad_images / "good.png"),
        "--text",
        "x",
        "--out",
        str(tmp_path / "o.png"),
    )
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["data", "procedural", "--out", "X", "--users", "0"],
            "--users: 0 must be an integer >= 1",
        ),
        (
            ["data", "procedural", "--out", "X", "--size", "-4"],
            "--size: -4 must be an integer >= 1",
        ),
        (["data", "procedural", "--out", "X", "--noise-ratio", "nan"], "--noise-ratio: nan must"),
        (
            ["data", "procedural", "--out", "X", "--history-length", "zero"],
            "'zero' is not an integer",
        ),
        (["data", "user", "X", "--history-length", "0"], "--history-length: 0 must be an integer"),
        (
            [
                "client",
                "generate",
                "--history",
                "a",
                "--reference",
                "b",
                "--text",
                "x",
                "--out",
                "o",
                "--timeout",
                "-1",
            ],
            "--timeout: -1 must be a finite number of seconds > 0",
        ),
        (["serve", "--admin-key", "nokey"], "must be HEADER=VALUE"),
    ],
)
def test_cli_refuses_bad_numbers_by_name(tmp_path, args, message):
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    res = pigeon(*args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "X").exists()


def test_cli_refuses_non_utf8_text(tmp_path, bad_images):
    good = str(bad_images / "good.png")
    for command in (
        ["generate", "--checkpoint", str(tmp_path)],
        ["client", "generate", "--url", "127.0.0.1:1"],
    ):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        res = subprocess.run(
            [
                sys.executable.encode(),
                b"-m",
                b"pigeon.cli",
                *[a.encode() for a in command],
                b"--history",
                good.encode(),
                b"--reference",
                good.encode(),
                b"--text",
                b"caf\xe9 \xff",
                b"--out",
                str(tmp_path / "o.png").encode(),
            ],
            capture_output=True,
            env=env,
            timeout=300,
        )
        stderr = res.stderr.decode("utf-8", "replace")
        assert res.returncode == 2 and "--text: not valid UTF-8 (byte 0xe9" in stderr, stderr


@pytest.mark.integration
def test_cli_client_against_a_dead_or_hung_server(tmp_path, bad_images):
    good = str(bad_images / "good.png")
    request = ["--history", good, "--reference", good, "--text", "x", "--out", str(tmp_path / "o")]
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    closed = port.getsockname()[1]
    port.close()  # nothing listens there now
    for protocol in ("grpc", "http"):
        res = pigeon(
            "client",
            "generate",
            "--url",
            f"127.0.0.1:{closed}",
            "--protocol",
            protocol,
            "--timeout",
            "5",
            *request,
        )
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert "refused" in res.stderr.lower() or "failed to connect" in res.stderr
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        for protocol in ("grpc", "http"):
            res = pigeon(
                "client",
                "generate",
                "--url",
                f"127.0.0.1:{hole.getsockname()[1]}",
                "--protocol",
                protocol,
                "--timeout",
                "2",
                *request,
            )
            assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
            assert "Deadline" in res.stderr or "no answer within 2" in res.stderr
    assert not (tmp_path / "o").exists()


def test_cli_client_gets_the_servers_named_error(served, bad_images, tmp_path):
    res = pigeon(
        "client",
        "generate",
        "--url",
        served.grpc_url,
        "--history",
        str(bad_images / "bomb.png"),
        "--reference",
        str(bad_images / "good.png"),
        "--text",
        "x",
        "--out",
        str(tmp_path / "o.png"),
        "--timeout",
        str(TIMEOUT_S),
    )
    assert res.returncode == 2 and "history[0]: 5000x5000 pixels exceeds the limit" in res.stderr
    res = pigeon(
        "client",
        "generate",
        "--url",
        served.grpc_url,
        "--history",
        str(bad_images / "one.png"),
        "--reference",
        str(bad_images / "good.png"),
        "--text",
        "x",
        "--out",
        str(tmp_path / "o.png"),
        "--steps",
        "1",
        "--timeout",
        str(TIMEOUT_S),
    )
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "o.png").size == (32, 32)


@pytest.mark.integration
def test_user_data_tool_reports_each_bad_line(tmp_path, bad_images):
    """Bad rows beyond tests/test_data_user.py: non-UTF-8 bytes, a JSON array, NUL bytes, a line
    cut off at the end of the file, and unusable image files; 1x1 images are fine."""
    from pigeon.data.user_data import load_user_data

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for i in range(6):
        (root / "images" / f"i{i}.png").write_bytes(png(emoji_like(i)))
    for name in ("zero.png", "bomb.png", "one.png", "truncated.png"):
        shutil.copy(bad_images / name, root / "images" / name)
    items = [
        *[
            json.dumps({"item": f"i{i}", "image": f"images/i{i}.png", "caption": "c"})
            for i in range(6)
        ],
        json.dumps({"item": "one", "image": "images/one.png", "caption": "a dot"}),  # 7: fine
        json.dumps({"item": "z", "image": "images/zero.png", "caption": "c"}),  # 8
        json.dumps({"item": "b", "image": "images/bomb.png", "caption": "c"}),  # 9
        json.dumps({"item": "t", "image": "images/truncated.png", "caption": "c"}),  # 10
    ]
    (root / "items.jsonl").write_text("\n".join(items) + "\n")
    rows = [json.dumps({"user": "u", "item": f"i{i}", "time": i}).encode() for i in range(6)]
    rows += [
        json.dumps({"user": "u", "item": "one", "time": 9}).encode(),  # 7: fine
        b'{"user": "u", "item": "i1", "time": 7, "group": "caf\xe9"}',  # 8: not UTF-8
        b'["u", "i1", 7]',  # 9: an array
        b'{"user": "u\x00", "item": "i1"\x00}',  # 10: NUL bytes
        b'{"user": "u", "item": "i2", "ti',  # 11: cut off, no newline at the end
    ]
    (root / "interactions.jsonl").write_bytes(b"\n".join(rows))
    data = load_user_data(root, history_length=5)
    report = {(p.file, p.line): p.reason for p in data.report}
    assert "not UTF-8" in report[("interactions.jsonl", 8)]
    assert "expected a JSON object, got list" in report[("interactions.jsonl", 9)]
    assert "malformed JSON" in report[("interactions.jsonl", 10)]
    assert "malformed JSON" in report[("interactions.jsonl", 11)]
    assert "zero.png: not a readable image" in report[("items.jsonl", 8)]
    assert "bomb.png: 5000x5000 pixels exceeds the limit" in report[("items.jsonl", 9)]
    assert "truncated.png" in report[("items.jsonl", 10)]
    assert "one" in data.items and data.image("one").shape == (1, 1, 3)
    assert len(data.windows()) == 2  # i0..i5 + one: 7 interactions, history 5 -> 2 windows
    res = pigeon("data", "user", str(root), "--history-length", "5")
    assert res.returncode == 0 and json.loads(res.stdout)["skipped_rows"] == len(data.report)
    (root / "items.jsonl").write_text("")  # zero-byte: nothing usable, said so
    res = pigeon("data", "user", str(root))
    assert res.returncode == 2 and "no (user, group) sequence has 6 usable" in res.stderr


@pytest.mark.integration
def test_emojiprefs_loader_names_bad_files_and_rows(tmp_path):
    from pigeon.data.emojiprefs import EmojiPrefsError, load_emojiprefs, load_manifest

    good = {
        "user_id": "u",
        "s_u": "noto",
        "noise_ratio": 0.2,
        "ambiguous": False,
        "history": [{"unified": "1f600", "style": "noto"}],
        "instruction": {"text": "a sticker", "ref": {"unified": "1f601", "style": "twemoji"}},
        "target": {"unified": "1f601", "style": "noto"},
    }
    cases = {
        b"\xff\xfe not utf-8": "not UTF-8 text (byte 0xff",
        b"[1, 2, 3]": "bad manifest row (TypeError",
        json.dumps({**good, "noise_ratio": "lots"}).encode(): "bad manifest row (ValueError",
        json.dumps({k: v for k, v in good.items() if k != "target"}).encode(): "(KeyError",
        b'{"user_id": "u", "s_u": ': "bad manifest row (JSONDecodeError",
    }
    path = tmp_path / "test.jsonl"
    for row, message in cases.items():
        path.write_bytes(json.dumps(good).encode() + b"\n" + row + b"\n")
        with pytest.raises(EmojiPrefsError) as info:
            load_manifest(path)
        assert "test.jsonl:2: " in str(info.value) and message in str(info.value), info.value
    path.write_bytes(json.dumps(good).encode() + b"\n")
    assert len(load_manifest(path)) == 1
    root = tmp_path / "ds"
    root.mkdir()
    (root / "concepts.json").write_text('{"size": 8, "styles": ["a", "b"], "concepts": [')
    with pytest.raises(EmojiPrefsError, match="concepts.json: not a valid concepts file"):
        load_emojiprefs(root)
    (root / "concepts.json").write_text(
        json.dumps({"size": 8, "styles": ["a", "b"], "concepts": []})
    )
    np.savez(root / "images_8.npz", rgb=np.zeros((0, 2, 8, 8, 3), np.uint8))
    data = (root / "images_8.npz").read_bytes()
    (root / "images_8.npz").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(EmojiPrefsError, match="images_8.npz: unreadable"):
        load_emojiprefs(root)
    np.savez(root / "images_8.npz", rgb=np.zeros((3, 2, 8, 8, 3), np.float32))
    with pytest.raises(EmojiPrefsError, match="rgb has dtype float32"):
        load_emojiprefs(root)
