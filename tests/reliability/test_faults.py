"""Faults while serving: killed model processes and servers, versions removed or corrupted under
load, hung and unreachable servers. Every wait is bounded."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pigeon.serving.client import ClientError, PigeonClient, deploy, loaded_versions
from pigeon.serving.repository import publish_version
from pigeon.serving.server import TritonServer

from ..test_serving import HISTORY, REFERENCE
from .support import (
    STARTUP_S,
    TIMEOUT_S,
    decode,
    generate,
    long_request_in_flight,
    make_repository,
    same_image,
    truncate_and_rehash,
    wait_until,
)


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
        truncate_and_rehash(repo / "unet" / "3", "model.onnx", 4096)
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
