"""Backpressure: past its queue bound the server refuses new requests with UNAVAILABLE / 503, and
serves the ones it took. The server runs one instance of each loop model and lets one request wait
for each (`request_queue_size` 1), so a long request holding the denoise loop leaves room for one
more request in all; the rest must be refused, not queued. Admission (`max_in_flight` 1): while one
request is inside the loops every other is refused at preprocess, and its slot comes back however
the request ends."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pigeon.serving.client import ClientError
from pigeon.serving.server import TritonServer

from .support import LIGHT, STARTUP_S, decode, generate, long_request_in_flight, make_repository

pytestmark = pytest.mark.triton

BOUNDED = dataclasses.replace(LIGHT, request_queue_size=1)
BURST = 8


@pytest.fixture(scope="module")
def bounded(tmp_path_factory, checkpoint_dir, artifacts):
    repo = make_repository(
        tmp_path_factory.mktemp("bounded"), checkpoint_dir, artifacts, serving=BOUNDED
    )
    with TritonServer(repo, startup_timeout_s=STARTUP_S) as server:
        yield server


def outcome(server, protocol: str, seed: int) -> tuple[str, float]:
    """("served" or the error's status, seconds) of one short request."""
    start = time.perf_counter()
    try:
        decode(generate(server, protocol, seed=seed))
        return "served", time.perf_counter() - start
    except ClientError as exc:
        expected = "503" if protocol == "http" else "UNAVAILABLE"
        shown = str(exc.http_status) if protocol == "http" else exc.status
        assert shown == expected, f"{protocol}: refused with {shown}, not {expected}: {exc}"
        return exc.status, time.perf_counter() - start


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_past_its_queue_bound_the_server_refuses_and_serves_what_it_took(bounded, protocol):
    alone = outcome(bounded, protocol, seed=0)
    assert alone[0] == "served"
    thread, box = long_request_in_flight(bounded, protocol)  # holds the one denoise instance
    with ThreadPoolExecutor(BURST) as pool:
        results = list(pool.map(lambda s: outcome(bounded, protocol, s), range(1, BURST + 1)))
    thread.join(STARTUP_S)
    assert "result" in box, f"the long request failed: {box}"
    served = [t for o, t in results if o == "served"]
    refused = [t for o, t in results if o == "UNAVAILABLE"]
    assert len(served) + len(refused) == BURST  # every request exactly one outcome
    # room for one request at most beside the long one (personalize's instance or queue, then
    # denoise's queue); every other one refused
    assert 1 <= len(refused) and len(served) <= 2, results
    # refused at the queue, not after waiting for the long request (which runs 400 steps)
    assert max(refused) < min(served, default=float("inf")), results
    assert outcome(bounded, protocol, seed=99)[0] == "served"  # and it serves again


ADMITTING = dataclasses.replace(LIGHT, max_in_flight=1)


@pytest.fixture(scope="module")
def admitting(tmp_path_factory, checkpoint_dir, artifacts):
    repo = make_repository(
        tmp_path_factory.mktemp("admitting"), checkpoint_dir, artifacts, serving=ADMITTING
    )
    with TritonServer(repo, startup_timeout_s=STARTUP_S) as server:
        yield server


def refused_by_admission(server, protocol: str, seed: int) -> str:
    """The error of a short request that must be refused: its status, checked to name the limit."""
    with pytest.raises(ClientError) as caught:
        generate(server, protocol, seed=seed)
    assert "max_in_flight" in str(caught.value), caught.value
    return str(caught.value.http_status) if protocol == "http" else caught.value.status


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_past_max_in_flight_the_server_refuses_at_once_and_gets_its_slot_back(admitting, protocol):
    assert outcome(admitting, protocol, seed=0)[0] == "served"
    thread, box = long_request_in_flight(admitting, protocol)  # holds the one slot
    with ThreadPoolExecutor(BURST) as pool:
        statuses = list(
            pool.map(lambda s: refused_by_admission(admitting, protocol, s), range(BURST))
        )
    # every one refused while the long request still ran: none waited for it
    assert thread.is_alive() and set(statuses) == {"503" if protocol == "http" else "UNAVAILABLE"}
    thread.join(STARTUP_S)
    assert "result" in box, f"the long request failed: {box}"
    assert outcome(admitting, protocol, seed=98)[0] == "served"  # its slot came back
    # a request stopped inside the loop (its own budget passed) gives its slot back too
    with pytest.raises(ClientError, match="timeout_ms=300 passed"):
        generate(admitting, protocol, steps=400, timeout_ms=300)
    assert outcome(admitting, protocol, seed=99)[0] == "served"


def without_admission_tensor(text: str) -> str:
    """A config.pbtxt as Pigeon wrote it before admission existed: no `in_flight_token` anywhere."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    for tensors in (config.input, config.output):
        kept = [t for t in tensors if t.name != "in_flight_token"]
        del tensors[:]
        tensors.extend(kept)
    for step in config.ensemble_scheduling.step:
        step.input_map.pop("in_flight_token", None)
        step.output_map.pop("in_flight_token", None)
    return text_format.MessageToString(config)


def test_a_repository_configured_before_admission_still_serves(tmp_path, checkpoint_dir, artifacts):
    """Configs written by an older Pigeon (no admission tensor) with this Pigeon's models: served,
    without admission, rather than every request failing on the missing input."""
    repo = make_repository(tmp_path, checkpoint_dir, artifacts)
    for name in ("pigeon", "preprocess", "personalize", "denoise"):
        path = repo / name / "config.pbtxt"
        old = without_admission_tensor(path.read_text())
        assert "in_flight_token" not in old
        path.write_text(old)
    with TritonServer(repo, startup_timeout_s=STARTUP_S) as server:
        assert outcome(server, "grpc", seed=0)[0] == "served"
