"""What the reliability tests share: the servers' settings, repositories and client helpers."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pigeon.checkpoint import load_config
from pigeon.config import ServingConfig
from pigeon.files import sha256_file
from pigeon.serving.client import PigeonClient
from pigeon.serving.repository import publish_version, write_configs

from ..test_serving import HISTORY, REFERENCE, png

ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 600  # bounded: a server that never gets ready fails the test (slow shared machines)
TIMEOUT_S = 300  # every client call's deadline (generous: CI machines are shared)
ADMIN = ("admin-key", "pigeon-test-key")
# the suite unloads, kills and counts the `unet` model, so its servers call it over BLS
BLS_UNET = ServingConfig(unet_in_process=False)
# fault servers: one process per Python model
LIGHT = dataclasses.replace(BLS_UNET, bls_instances=1)


def make_repository(root: Path, checkpoint: Path, artifacts: Path, versions=(1,), serving=LIGHT):
    cpu = root / "cpu"
    write_configs(cpu, load_config(checkpoint), serving, "cpu")
    for version in versions:
        publish_version(cpu, checkpoint, artifacts, version)
    return cpu


def generate(server, protocol="grpc", timeout_s=TIMEOUT_S, **kwargs):
    request = {"history": HISTORY, "reference": REFERENCE, "text": "a red circle", "seed": 4}
    request.update(kwargs)
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with PigeonClient(url, protocol, timeout_s=timeout_s) as client:
        return client.generate(**{"steps": 2, **request})


def decode(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.image_png)).convert("RGB"))


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 2


def wait_until(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s:.0f}s: {what}")


def unet_inferences(server) -> int:
    with PigeonClient(server.grpc_url, "grpc", timeout_s=30) as client:
        return int(client.statistics("unet")["model_stats"][0].get("inference_count", 0))


def in_background(fn):
    """Run fn() in a thread; returns (thread, box) with box["result"] or box["error"]."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except Exception as exc:  # handed to the test through the box
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def long_request_in_flight(server, protocol="grpc", steps=400):
    """Start a long request and return once it is inside the denoising loop (the UNet counts)."""
    before = unet_inferences(server)
    thread, box = in_background(lambda: generate(server, protocol, steps=steps, text="long"))
    wait_until(lambda: unet_inferences(server) > before or box, STARTUP_S, "the UNet started")
    assert not box, f"the long request ended before the fault: {box}"
    return thread, box


# --- bad files -----------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (1-bit grey) and holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\x00\x00\x00\x00IEND\xaeB`\x82"
    )


def bomb(side: int = 5000) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


TRUNCATED = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[:300]
ONE_PIXEL = png(np.full((1, 1, 3), 90, np.uint8))


def truncate_and_rehash(folder: Path, name: str, keep: int | None) -> None:
    """Truncate `folder/name` to `keep` bytes (None: zero bytes) and record its new SHA-256 in the
    version's manifest, so that the file itself, not the hash check, is what is broken."""
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data[: keep or 0])
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["components"][folder.parent.name]["files"][name] = sha256_file(path)
    manifest_path.write_text(json.dumps(manifest))
