"""Reliability and security under load, faults and bad input (results in docs/RELIABILITY.md).

The real tritonserver on the tiny preset's ONNX files (ONNX Runtime inside the Python backend), traffic to
127.0.0.1 only, no mocks. A full disk is a real OS refusal: the write runs in a subprocess whose file
size limit (RLIMIT_FSIZE) makes the kernel fail it with EFBIG, or, where user namespaces allow a
mount, on a small tmpfs that fails it with ENOSPC. Every wait is bounded: a hang fails the test, no
test asserts a speed.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import ipaddress
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pigeon.checkpoint import CheckpointError, load_checkpoint, load_config, save_checkpoint
from pigeon.config import ServingConfig
from pigeon.export.manifest import read_manifest
from pigeon.files import sha256_file, write_atomic
from pigeon.serving.client import ClientError, PigeonClient, deploy, loaded_versions
from pigeon.serving.repository import publish_version, write_configs
from pigeon.serving.server import ServerError, TritonServer
from pigeon.serving.triton_backend import verify_version_files

from .conftest import emoji_like, make_model
from .test_cli import pigeon
from .test_serving import HISTORY, REFERENCE, png

ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 600  # bounded: a server that never gets ready fails the test (slow shared machines)
TIMEOUT_S = 300  # every client call's deadline (generous: CI machines are shared)
ADMIN = ("admin-key", "pigeon-test-key")
# the suite unloads, kills and counts the `unet` model, so its servers call it over BLS
BLS_UNET = ServingConfig(unet_in_process=False)
# fault servers: one process per Python model
LIGHT = dataclasses.replace(BLS_UNET, bls_instances=1)


# --- shared setup -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, checkpoint_dir):
    """One validated ONNX export of the tiny checkpoint; every repository below publishes it."""
    from pigeon.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export_onnx(checkpoint_dir, out)
    return out


def make_repository(root: Path, checkpoint: Path, artifacts: Path, versions=(1,), serving=LIGHT):
    cpu = root / "cpu"
    write_configs(cpu, load_config(checkpoint), serving, "cpu")
    for version in versions:
        publish_version(cpu, checkpoint, artifacts, version)
    return cpu


@pytest.fixture(scope="module")
def served(tmp_path_factory, checkpoint_dir, artifacts):
    """The default serving config (4 instances of each loop model), admin APIs behind a key."""
    repo = make_repository(
        tmp_path_factory.mktemp("served"), checkpoint_dir, artifacts, serving=BLS_UNET
    )
    with TritonServer(repo, admin_header=ADMIN, startup_timeout_s=STARTUP_S) as server:
        yield server


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


# --- 3. bad input: the server -------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
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


def _bomb(side: int = 5000) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


TRUNCATED = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[:300]
ONE_PIXEL = png(np.full((1, 1, 3), 90, np.uint8))

# (request fields, the error it must get); test_serving.py covers: not an image, empty history,
# 8 images, empty text, 1001 characters, steps=0, guidance=nan, reference_mask_ratio=2.0, a
# 5000x5000 history image and non-UTF-8 text
SERVER_BAD = {
    "zero_byte_history_image": ({"history": [b""]}, r"history\[0\]: not a readable image"),
    "zero_byte_reference": ({"reference": b""}, r"reference: not a readable image"),
    "truncated_png": (
        {"history": [TRUNCATED]},
        r"history\[0\]: (truncated or corrupt|not a readable)",
    ),
    "bomb_reference": ({"reference": _bomb()}, r"reference: 5000x5000 pixels exceeds the limit"),
    "header_claims_10_gigapixels": (
        {"history": [_png_header(100_000, 100_000)]},
        r"history\[0\]: .*exceeds the limit of 16777216 pixels",
    ),
    "whitespace_text": ({"text": " \n\t "}, r"text is empty"),
    "100k_character_text": ({"text": "y" * 100_000}, r"text has 100000 characters, more than"),
    "inf_guidance": ({"guidance": float("inf")}, r"guidance=inf must be a finite number"),
    "negative_guidance": ({"guidance": -1.0}, r"guidance=-1.0 must be a finite number >= 0"),
    "nan_mask_ratio": (
        {"reference_mask_ratio": float("nan")},
        r"reference_mask_ratio=nan must be in \[0, 1\]",
    ),
    "negative_mask_ratio": (
        {"reference_mask_ratio": -0.5},
        r"reference_mask_ratio=-0.5 must be in \[0, 1\]",
    ),
    "negative_steps": ({"steps": -3}, r"steps=-3 must be an integer in \[1, "),
    "billion_steps": ({"steps": 10**9}, r"steps=1000000000 must be an integer in \[1, "),
    "negative_seed": ({"seed": -1}, r"seed=-1 must be a non-negative integer"),
    "thousand_image_history": (
        {"history": [ONE_PIXEL] * 1000},
        r"history has 1000 images, more than the configured maximum of 5",
    ),
}


@pytest.mark.parametrize("case", list(SERVER_BAD))
def test_bad_request_gets_a_named_error_and_the_next_good_one_succeeds(served, case):
    """The client's fault is INVALID_ARGUMENT over gRPC and 400 over HTTP, never a 500 that load
    balancers would retry and page someone for."""
    fields, message = SERVER_BAD[case]
    protocol = "http" if sorted(SERVER_BAD).index(case) % 2 else "grpc"
    with pytest.raises(ClientError, match=message) as info:
        generate(served, protocol, **fields)
    assert (info.value.status, info.value.http_status) == ("INVALID_ARGUMENT", 400), protocol
    assert generate(served).image_png[:8] == b"\x89PNG\r\n\x1a\n"


def _raw(server, inputs: dict) -> str:
    """Send tensors below PigeonClient (wrong dtypes and shapes); returns the server's error."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    tensors = []
    for name, (value, dtype) in inputs.items():
        tensor = tc.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client = tc.InferenceServerClient(server.grpc_url)
    try:
        client.infer("pigeon", tensors, client_timeout=TIMEOUT_S)
    except InferenceServerException as exc:
        return exc.message()
    finally:
        client.close()
    raise AssertionError(f"the server accepted {sorted(inputs)}")


GOOD_RAW = {
    "history_images": (np.array(HISTORY[:2], np.object_), "BYTES"),
    "reference_image": (np.array([REFERENCE], np.object_), "BYTES"),
    "text": (np.array([b"a cat"], np.object_), "BYTES"),
}
RAW_BAD = {
    "seed_as_float": (
        {**GOOD_RAW, "seed": (np.array([1.5], np.float32), "FP32")},
        r"input 'seed' data-type is 'FP32', but model 'pigeon' expects 'INT64'",
    ),
    "steps_as_bytes": (
        {**GOOD_RAW, "steps": (np.array([b"2"], np.object_), "BYTES")},
        r"steps",
    ),
    "history_as_int64": (
        {**GOOD_RAW, "history_images": (np.array([1, 2], np.int64), "INT64")},
        r"history_images",
    ),
    "two_references": (
        {**GOOD_RAW, "reference_image": (np.array([REFERENCE, REFERENCE], np.object_), "BYTES")},
        r"reference_image",
    ),
    "history_of_rank_2": (
        {**GOOD_RAW, "history_images": (np.array([HISTORY[:2]], np.object_), "BYTES")},
        r"history_images",
    ),
    "text_missing": ({k: v for k, v in GOOD_RAW.items() if k != "text"}, r"text"),
    "unknown_input": (
        {**GOOD_RAW, "temperature": (np.array([1.0], np.float32), "FP32")},
        r"temperature",
    ),
}


@pytest.mark.parametrize("case", list(RAW_BAD))
def test_wrong_dtypes_and_shapes_are_named_and_the_server_keeps_serving(served, case):
    inputs, message = RAW_BAD[case]
    import re

    error = _raw(served, inputs)
    assert re.search(message, error), error
    assert generate(served).image_png[:4] == b"\x89PNG"


def test_one_pixel_images_are_served(served, checkpoint_dir):
    from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
    from pigeon.inference.runners import OrtRunner
    from pigeon.serving.images import load_image

    result = decode(generate(served, history=[ONE_PIXEL] * 3, reference=ONE_PIXEL, steps=3))
    ckpt = load_checkpoint(checkpoint_dir)
    files = {p.parent.parent.name: p for p in served.repository.glob("*/1/model.onnx")}
    pipe = PigeonPipeline(ckpt.config, ckpt.tokenizer, OrtRunner.from_files(files, ckpt.config))
    expected = pipe(
        GenerationRequest(
            history=[load_image(ONE_PIXEL)] * 3,
            reference=load_image(ONE_PIXEL),
            text="a red circle",
            seed=4,
            steps=3,
        )
    )[0].image
    assert same_image(result, expected)  # the same image as in process, from 1x1 inputs


def test_client_refuses_what_it_cannot_send():
    with pytest.raises(ValueError, match=r"timeout_s=nan must be a finite number"):
        PigeonClient("127.0.0.1:1", "grpc", timeout_s=float("nan"))
    with pytest.raises(ValueError, match=r"timeout_s=0 must be"):
        PigeonClient("127.0.0.1:1", "http", timeout_s=0)
    with PigeonClient("127.0.0.1:1", "grpc", timeout_s=5) as client:
        with pytest.raises(ClientError, match="text is not valid UTF-8"):
            client.generate(HISTORY, REFERENCE, "bad \udcff text")
        with pytest.raises(
            ClientError, match=r"seed=1180591620717411303424 cannot be sent as INT64"
        ):
            client.generate(HISTORY, REFERENCE, "x", seed=2**70)


# --- 1. load ----------------------------------------------------------------------------------


def test_load_of_mixed_requests_loses_nothing(served, tmp_path):
    from benchmarks.common import append_jsonl
    from benchmarks.load import run_load

    record = run_load(served, 300, [8, 32], duration_limit_s=1800, timeout_s=TIMEOUT_S, log=print)
    append_jsonl(tmp_path / "load.jsonl", record)
    total = record["total"]
    assert total["failed"] == 0, total["failed_reasons"]
    assert total["sent"] == 300 and total["not_sent"] == 0
    assert total["refused_as_expected"] == record["mix"]["bad"]
    assert total["succeeded"] == record["mix"]["new"] + record["mix"]["returning"]
    assert record["checks"] == {k: True for k in record["checks"]}, record["checks"]
    assert record["held"]
    print(json.dumps({k: record[k] for k in ("total", "memory_bytes", "checks")}, indent=1))


def run_load_tool(tmp_path, requests: int, concurrency: str, limit_s: int) -> dict:
    """`python -m benchmarks.load` as a user runs it; returns its JSON line."""
    out = tmp_path / "load.jsonl"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.load",
            "--requests",
            str(requests),
            "--concurrency",
            concurrency,
            "--duration-limit",
            str(limit_s),
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=limit_s + 400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text().splitlines()[-1])


def test_load_tool_runs_end_to_end(tmp_path):
    """The standalone tool, CI-sized: its own repository build, server, mix and checks."""
    record = run_load_tool(tmp_path, 40, "1,4", 300)
    assert record["held"] and record["total"]["sent"] == 40 and record["total"]["failed"] == 0


@pytest.mark.slow
def test_long_load_run_holds(tmp_path):
    """The standalone tool at its documented size (thousands of requests, concurrency 1, 8, 32)."""
    record = run_load_tool(tmp_path, 3000, "1,8,32", 3600)
    assert record["held"] and record["total"]["sent"] == 3000 and record["total"]["failed"] == 0


# --- 4. safety of artifacts ---------------------------------------------------------------------


def _listening(port: int) -> list[str]:
    """Local addresses of the LISTEN sockets on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.append(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
                else:
                    raw = bytes.fromhex(address)
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    v6 = ipaddress.IPv6Address(words)  # ::ffff:127.0.0.1 accepts 127.0.0.1 only
                    found.append(str(v6.ipv4_mapped or v6))
    return found


def test_server_binds_to_loopback_only(served):
    from pigeon.cli import build_parser

    for port in (served.http_port, served.grpc_port, served.metrics_port):
        assert _listening(port) == ["127.0.0.1"], (port, _listening(port))
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.admin_key is None


def test_admin_apis_need_the_key_and_inference_does_not(served):
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(served.http_url)
    with pytest.raises(InferenceServerException, match="(?i)restricted|admin-key"):
        client.unload_model("pigeon")
    with pytest.raises(InferenceServerException, match="(?i)restricted|admin-key"):
        client.load_model("unet", config=json.dumps({"backend": "python"}))
    gclient = grpc.InferenceServerClient(served.grpc_url)
    with pytest.raises(InferenceServerException, match="(?i)restricted|admin-key"):
        gclient.unload_model("pigeon")
    assert loaded_versions(client, served.admin_headers)["pigeon"] == 1
    with pytest.raises(ClientError, match="(?i)restricted|admin-key"):
        deploy(served.http_url, served.repository, 1)
    deploy(served.http_url, served.repository, 1, served.admin_headers)
    client.close()
    gclient.close()
    assert generate(served).image_png[:4] == b"\x89PNG"  # inference needs no key


class _Payload:
    """Unpickling this runs `touch <path>`: a file that must never appear."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_weights_never_unpickle(tmp_path, tiny_config, tokenizer):
    ckpt = save_checkpoint(make_model(tiny_config), tokenizer, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    weights = ckpt / "unet" / "model.safetensors"
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    index = json.loads((ckpt / "pipeline.json").read_text())
    index["files"]["unet/model.safetensors"] = sha256_file(weights)  # hash check passes
    (ckpt / "pipeline.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unet/model.safetensors: unreadable weights"):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_no_code_path_unpickles():
    """Weights: safetensors; configs, manifests, tokenizer: JSON; arrays: np.load without pickle.
    The one torch.load (the training optimizer state) uses the weights-only loader."""
    offenders = []
    for path in sorted((ROOT / "pigeon").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n in ("pickle", "cPickle", "dill", "joblib") for n in names):
                    offenders.append(f"{path}:{node.lineno} imports pickle")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                keywords = {k.arg: k.value for k in node.keywords}
                call = node.func.attr
                owner = getattr(node.func.value, "id", "")
                if call == "load" and owner == "torch":
                    weights_only = keywords.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        offenders.append(f"{path}:{node.lineno} torch.load without weights_only")
                if call == "load" and owner == "np":
                    allow = keywords.get("allow_pickle")
                    if not (isinstance(allow, ast.Constant) and allow.value is False):
                        offenders.append(f"{path}:{node.lineno} np.load without allow_pickle=False")
    assert offenders == []


def _truncate_and_rehash(folder: Path, name: str, keep: int | None) -> None:
    """Truncate `folder/name` to `keep` bytes (None: zero bytes) and record its new SHA-256 in the
    version's manifest, so that the file itself, not the hash check, is what is broken."""
    path = folder / name
    data = path.read_bytes()
    path.write_bytes(data[: keep or 0])
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["components"][folder.parent.name]["files"][name] = sha256_file(path)
    manifest_path.write_text(json.dumps(manifest))


def test_corrupt_files_at_load_are_refused_by_name(tmp_path, checkpoint_dir, artifacts):
    """One repository, several broken files: the server refuses to start and its error names each."""
    repo = make_repository(tmp_path, checkpoint_dir, artifacts)
    _truncate_and_rehash(repo / "unet" / "1", "model.onnx", 4096)  # truncated, hash "fine"
    _truncate_and_rehash(repo / "vae_decoder" / "1", "model.onnx", None)  # zero bytes
    (repo / "mask_generator" / "1" / "manifest.json").write_text('{"components": ')  # malformed
    tokenizer = repo / "preprocess" / "1" / "pipeline" / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")  # altered (still valid JSON), hash not
    altered = repo / "history_encoder" / "1" / "model.onnx"
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    server = TritonServer(repo, log_file=tmp_path / "log.txt", startup_timeout_s=STARTUP_S)
    with pytest.raises(ServerError, match="failed to load") as info:
        server.start()
    log = (tmp_path / "log.txt").read_text()
    assert "history_encoder/1/model.onnx: SHA-256 differs from the manifest" in log
    assert "tokenizer/tokenizer.json: SHA-256 differs from pipeline.json" in log
    for model in ("unet", "vae_decoder", "mask_generator", "preprocess", "history_encoder"):
        assert f"failed to load '{model}' version 1" in log, model
    assert "failed to load" in str(info.value)
    assert server.process.poll() is not None  # nothing left running


def test_a_folder_that_is_not_a_model_is_named_and_leftover_staging_is_ignored(
    tmp_path, checkpoint_dir, artifacts
):
    from pigeon.files import staging_dir

    repo = make_repository(tmp_path, checkpoint_dir, artifacts)
    # what a killed `pigeon export all` leaves: its staging folder beside the target's repository
    # and per-model staging folders; neither stops the server
    (staging_dir(tmp_path / "cpu-v2") / "artifacts").mkdir()
    staging_dir(repo / "unet" / "2")
    with TritonServer(repo, startup_timeout_s=STARTUP_S) as server:
        assert generate(server).image_png[:4] == b"\x89PNG"
    (repo / "notes").mkdir()  # a stray folder inside the model repository
    with pytest.raises(ServerError, match=r"Poll failed for model directory 'notes'"):
        TritonServer(repo, startup_timeout_s=STARTUP_S).start()


# --- 2. faults --------------------------------------------------------------------------------


def test_killed_model_process_fails_its_request_clearly_and_is_restarted(
    tmp_path, checkpoint_dir, artifacts
):
    repo = make_repository(tmp_path, checkpoint_dir, artifacts)
    with TritonServer(repo, startup_timeout_s=STARTUP_S, supervise_s=1.0) as server:
        answer = decode(generate(server, steps=6))
        [victim] = [s for s in server.stubs() if s.model == "denoise"]
        thread, box = long_request_in_flight(server)
        os.kill(victim.pid, signal.SIGKILL)
        thread.join(TIMEOUT_S + 30)
        assert not thread.is_alive(), "the client hung"
        assert isinstance(box.get("error"), ClientError), box
        assert "Stub process 'denoise_0_0' is not healthy" in str(box["error"])
        # the supervisor sees the dead process and reloads denoise on the version it served
        wait_until(lambda: server.heals, STARTUP_S, "the supervisor reloaded denoise")
        assert server.heals[0]["model"] == "denoise" and server.heals[0]["version"] == 1

        def recovered():
            try:
                return [decode(generate(server, steps=6))]
            except ClientError:
                return None

        [image] = wait_until(recovered, STARTUP_S, "a request succeeds again", every_s=1.0)
        assert same_image(image, answer)  # the same image as before the fault
        [fresh] = [s for s in server.stubs() if s.model == "denoise" and s.alive]
        assert fresh.pid != victim.pid


def test_versions_removed_unloaded_or_corrupt_while_serving(tmp_path, checkpoint_dir, artifacts):
    repo = make_repository(tmp_path, checkpoint_dir, artifacts, versions=(1, 2))
    import tritonclient.http as http

    with TritonServer(repo, startup_timeout_s=STARTUP_S) as server:
        admin = http.InferenceServerClient(server.http_url, network_timeout=300)
        assert set(loaded_versions(admin).values()) == {2}  # the latest, by default
        answer = decode(generate(server))
        # 1. version 2's files removed while requests run: the loaded models keep serving
        results, done = [], threading.Event()

        def load():
            while not done.is_set():
                try:
                    results.append(decode(generate(server)))
                except ClientError as exc:
                    results.append(exc)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        wait_until(lambda: len(results) >= 1, STARTUP_S, "requests are flowing")
        for model_dir in repo.iterdir():
            if (model_dir / "2").is_dir():
                shutil.rmtree(model_dir / "2")
        count = len(results)
        wait_until(lambda: len(results) >= count + 3, STARTUP_S, "requests after the removal")
        done.set()
        thread.join(TIMEOUT_S)
        assert all(isinstance(r, np.ndarray) and same_image(r, answer) for r in results), [
            r for r in results if not isinstance(r, np.ndarray)
        ]
        with pytest.raises(ClientError, match="version 2 is not published for"):
            deploy(server.http_url, repo, 2)
        deploy(server.http_url, repo, 1)  # recovery: the version still on disk
        assert all(v == 1 for m, v in loaded_versions(admin).items() if m != "pigeon")
        assert same_image(decode(generate(server)), answer)  # same weights in both versions

        # 2. a model unloaded while serving: a named error, then a reload recovers
        admin.unload_model("unet")
        wait_until(lambda: "unet" not in loaded_versions(admin), STARTUP_S, "unet is unloaded")
        with pytest.raises(ClientError, match="unet"):
            generate(server)
        deploy(server.http_url, repo, 1)
        assert same_image(decode(generate(server)), answer)

        # 3. a corrupt version: refused by name, and the models already switched go back
        publish_version(repo, checkpoint_dir, artifacts, 3)
        _truncate_and_rehash(repo / "unet" / "3", "model.onnx", 4096)
        with pytest.raises(ClientError, match=r"deploying version 3: .*unet") as info:
            deploy(server.http_url, repo, 3)
        assert "put back" in str(info.value)
        assert all(v == 1 for m, v in loaded_versions(admin).items() if m != "pigeon")
        assert same_image(decode(generate(server)), answer)
        admin.close()


def test_hung_server_is_a_client_timeout_not_a_hang(tmp_path, checkpoint_dir, artifacts):
    repo = make_repository(tmp_path, checkpoint_dir, artifacts)
    with TritonServer(repo, startup_timeout_s=STARTUP_S) as server:
        os.kill(server.process.pid, signal.SIGSTOP)  # the server stops answering
        try:
            for protocol, message in (("grpc", "(?i)deadline"), ("http", "no answer within")):
                start = time.monotonic()
                with pytest.raises(ClientError, match=message):
                    generate(server, protocol, timeout_s=2)
                assert time.monotonic() - start < 60  # bounded by the deadline, not a hang
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert generate(server, "http").image_png[:4] == b"\x89PNG"  # and it recovers

        # a request in flight when the server is stopped finishes (the ensemble is drained first)
        thread, box = long_request_in_flight(server, steps=100)
        assert server.stop(timeout_s=TIMEOUT_S) == 0
        thread.join(TIMEOUT_S)
        assert not thread.is_alive() and "result" in box, box
        assert box["result"].image_png[:4] == b"\x89PNG"
    for protocol in ("grpc", "http"):
        with pytest.raises(ClientError, match="(?i)refused|failed to connect|unavailable"):
            generate(server, protocol, timeout_s=5)


def test_killed_server_fails_the_request_in_flight_and_leaves_no_process(
    tmp_path, checkpoint_dir, artifacts
):
    repo = make_repository(tmp_path, checkpoint_dir, artifacts)
    server = TritonServer(repo, startup_timeout_s=STARTUP_S).start()
    try:
        stubs = [s.pid for s in server.stubs()]
        thread, box = long_request_in_flight(server, protocol="http")
        os.kill(server.process.pid, signal.SIGKILL)  # the server alone, as the OOM killer would
        thread.join(TIMEOUT_S + 30)
        assert not thread.is_alive(), "the client hung"
        assert isinstance(box.get("error"), ClientError), box
    finally:
        server.stop()

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
        except (OSError, IndexError):
            return True

    # its stub processes exit too (they watch their parent; stop() kills what is left of its group)
    wait_until(lambda: all(gone(pid) for pid in stubs), 60, f"stub processes {stubs} exit")


def test_black_hole_address_times_out(tmp_path):
    with socket.socket() as hole:  # accepts connections, never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        url = f"127.0.0.1:{hole.getsockname()[1]}"
        for protocol, message in (("grpc", "(?i)deadline"), ("http", "no answer within 2s")):
            start = time.monotonic()
            with PigeonClient(url, protocol, timeout_s=2) as client:
                with pytest.raises(ClientError, match=message):
                    client.generate(HISTORY, REFERENCE, "x")
            assert time.monotonic() - start < 60


# --- 2. faults: a full disk -----------------------------------------------------------------------


def run_limited(code: str, max_file_bytes: int) -> subprocess.CompletedProcess:
    """Run Python `code` in a subprocess whose writes beyond `max_file_bytes` per file fail with
    EFBIG (RLIMIT_FSIZE; SIGXFSZ ignored so the write returns the error instead of killing it)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
        env=env,
        cwd=ROOT,
    )


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p) if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_full_disk_while_publishing_publishes_nothing(tmp_path, checkpoint_dir, artifacts):
    repo = make_repository(tmp_path, checkpoint_dir, artifacts)
    before = tree(repo)
    sizes = sorted(p.stat().st_size for p in artifacts.rglob("*.onnx"))
    limit = sizes[-1] // 2  # the largest network's copy fails half way, after smaller ones
    res = run_limited(
        "from pathlib import Path\n"
        "from pigeon.serving.repository import publish_version\n"
        f"publish_version(Path({str(repo)!r}), Path({str(checkpoint_dir)!r}), "
        f"Path({str(artifacts)!r}), 2)\n",
        limit,
    )
    assert res.returncode != 0 and "File too large" in res.stderr, res.stderr[-2000:]
    assert tree(repo) == before  # no version 2 folder, no staging folder, version 1 untouched
    publish_version(repo, checkpoint_dir, artifacts, 2)  # with room again, it publishes
    for network in read_manifest(artifacts)["components"]:
        verify_version_files(repo / network / "2", network)


def test_full_disk_while_exporting_publishes_nothing(tmp_path, checkpoint_dir, artifacts):
    make_repository(tmp_path, checkpoint_dir, artifacts)  # a served version 1 beside it
    before = tree(tmp_path)
    res = run_limited(
        "from pigeon.export.publish import export_all\n"
        f"export_all({str(checkpoint_dir)!r}, {str(tmp_path)!r}, 2)\n",
        64 * 1024,  # the first ONNX file written is larger
    )
    assert res.returncode != 0 and "File too large" in res.stderr, res.stderr[-2000:]
    assert "onnx_export.py" in res.stderr  # it failed writing the export, not elsewhere
    assert tree(tmp_path) == before


def test_full_disk_while_exporting_field_formats_leaves_no_folder(tmp_path, checkpoint_dir):
    """`pigeon checkpoint export-diffusers` / `export-peft` write into a staging folder: a write that
    fails half way leaves neither the --out folder nor the staging folder behind."""
    for command in ("export-diffusers", "export-peft"):
        out = tmp_path / command
        res = run_limited(
            "from pigeon.cli import main\n"
            f"raise SystemExit(main(['checkpoint', {command!r}, {str(checkpoint_dir)!r}, "
            f"'--out', {str(out)!r}]))\n",
            16 * 1024,
        )
        assert res.returncode != 0 and "File too large" in res.stderr, res.stderr[-2000:]
        assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_full_disk_while_saving_a_checkpoint_keeps_the_old_one(tmp_path, tiny_config, tokenizer):
    path = save_checkpoint(make_model(tiny_config, seed=1), tokenizer, tmp_path / "ckpt")
    digest = load_checkpoint(path).digest
    res = run_limited(
        "import torch\n"
        "from tests.conftest import make_model\n"
        "from pigeon.config import preset\n"
        "from pigeon.checkpoint import save_checkpoint\n"
        "from pigeon.vocab import TextTokenizer\n"
        f"tok = TextTokenizer.load({str(path / 'tokenizer' / 'tokenizer.json')!r}, "
        f"{tiny_config.personalizer.text_vocab_size})\n"
        f"save_checkpoint(make_model(preset('tiny'), seed=2), tok, {str(path)!r}, overwrite=True)\n",
        64 * 1024,
    )
    assert res.returncode != 0 and "File too large" in res.stderr, res.stderr[-2000:]
    assert load_checkpoint(path).digest == digest  # the old checkpoint, whole and verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folder left
    target = tmp_path / "small.json"
    write_atomic(target, "old\n")
    res = run_limited(
        f"from pigeon.files import write_atomic\nwrite_atomic({str(target)!r}, 'x' * 100000)\n",
        1024,
    )
    assert res.returncode != 0 and target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "small.json"]


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs -o size=64k tmpfs /tmp && echo ok",
        ],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() == "ok"


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespace with mount rights here")
def test_no_space_left_on_a_small_tmpfs_publishes_nothing(tmp_path, checkpoint_dir, artifacts):
    """A real ENOSPC: the repository lives on a tmpfs too small for a version."""
    mount = tmp_path / "disk"
    mount.mkdir()
    total = sum(p.stat().st_size for p in artifacts.rglob("*") if p.is_file())
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from pigeon.checkpoint import load_config\n"
        "from pigeon.config import ServingConfig\n"
        "from pigeon.serving.repository import publish_version, write_configs\n"
        f"repo = Path({str(mount)!r}) / 'cpu'\n"
        f"write_configs(repo, load_config({str(checkpoint_dir)!r}), ServingConfig(), 'cpu')\n"
        "try:\n"
        f"    publish_version(repo, Path({str(checkpoint_dir)!r}), Path({str(artifacts)!r}), 1)\n"
        "    error = None\n"
        "except OSError as exc:\n"
        "    error = str(exc)\n"
        "files = sorted(str(p.relative_to(repo)) for p in repo.rglob('*'))\n"
        "print(json.dumps({'error': error, 'files': files}))\n"
    )
    res = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            f'mount -t tmpfs -o size={total // 2} tmpfs {mount} && exec {sys.executable} -c "$0"',
            code,
        ],
        capture_output=True,
        text=True,
        timeout=STARTUP_S,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"] and "No space left on device" in out["error"], res.stderr[-2000:]
    assert all(name.endswith("config.pbtxt") or "/" not in name for name in out["files"]), out


# --- 3. bad input: the CLI and the data tools ------------------------------------------------------


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_images")
    files = {
        "zero.png": b"",
        "truncated.png": TRUNCATED,
        "bomb.png": _bomb(),
        "claims_10gp.png": _png_header(100_000, 100_000),
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
