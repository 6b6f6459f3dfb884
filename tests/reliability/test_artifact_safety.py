"""Safety of the artifacts and the server: loopback only, admin APIs behind a key, no pickle, corrupt
or foreign files refused by name."""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import pickle
import socket
import struct
from pathlib import Path

import pytest

from pigeon.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pigeon.files import sha256_file
from pigeon.serving.client import ClientError, deploy, loaded_versions
from pigeon.serving.server import ServerError, TritonServer

from ..conftest import make_model
from .support import (
    ROOT,
    STARTUP_S,
    generate,
    make_repository,
    truncate_and_rehash,
)


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


def test_corrupt_files_at_load_are_refused_by_name(tmp_path, checkpoint_dir, artifacts):
    """One repository, several broken files: the server refuses to start and its error names each."""
    repo = make_repository(tmp_path, checkpoint_dir, artifacts)
    truncate_and_rehash(repo / "unet" / "1", "model.onnx", 4096)  # truncated, hash "fine"
    truncate_and_rehash(repo / "vae_decoder" / "1", "model.onnx", None)  # zero bytes
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
