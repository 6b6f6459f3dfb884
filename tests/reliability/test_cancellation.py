"""Cancellation: a request carries its time budget (`timeout_ms`; PigeonClient sends its own
timeout), and the loops stop at it between steps, so clients that hang up do not leave their work
behind. The server runs one instance of each loop model, so work left running would hold every
request after it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pigeon.serving.client import ClientError
from pigeon.serving.server import TritonServer

from .support import STARTUP_S, decode, generate, make_repository, unet_inferences

pytestmark = pytest.mark.triton

HANG_UPS = 8
LONG_STEPS = 400


@pytest.fixture(scope="module")
def single(tmp_path_factory, checkpoint_dir, artifacts):
    repo = make_repository(tmp_path_factory.mktemp("single"), checkpoint_dir, artifacts)
    with TritonServer(repo, startup_timeout_s=STARTUP_S) as server:
        yield server


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hang_up(server, protocol: str, seed: int) -> str:
    """A long request whose client stops waiting after 0.5 s (and sends that as its budget):
    "stopped" if the client's timer or the server's check ended it, else what happened."""
    try:
        generate(server, protocol, timeout_s=0.5, steps=LONG_STEPS, seed=seed)
    except ClientError as exc:
        by_server = exc.status == "UNAVAILABLE" and "timeout_ms=500 passed" in str(exc)
        return "stopped" if exc.status == "DEADLINE_EXCEEDED" or by_server else f"{exc!r}"
    return "served"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_clients_that_hang_up_free_the_server_for_new_work(single, protocol):
    """8 clients ask for 400 steps each and hang up after 0.5 s. If their work ran on, a following
    request would wait for 8 whole long requests; it waits for less than one, and the UNet ran
    fewer steps for the 8 than one of them asks for."""
    before = unet_inferences(single)
    one_long = timed(lambda: decode(generate(single, protocol, steps=LONG_STEPS, seed=1)))
    per_long = unet_inferences(single) - before
    before += per_long
    with ThreadPoolExecutor(HANG_UPS) as pool:
        statuses = list(pool.map(lambda s: hang_up(single, protocol, s), range(HANG_UPS)))
    assert statuses == ["stopped"] * HANG_UPS, statuses
    following = timed(lambda: decode(generate(single, protocol, seed=2)))
    spent = unet_inferences(single) - before
    assert following < one_long, (following, one_long)
    assert spent < per_long, (spent, per_long)  # the 8 and the following one together


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_past_its_timeout_is_cancelled_by_the_server(single, protocol):
    """The client waits, the request's own budget (300 ms) passes: the server stops it and says so
    with UNAVAILABLE / 503, naming the budget and the step; the next request is served."""
    with pytest.raises(ClientError) as caught:
        generate(single, protocol, steps=LONG_STEPS, timeout_ms=300)
    assert caught.value.status == "UNAVAILABLE", caught.value
    assert caught.value.http_status == 503
    assert "timeout_ms=300 passed after" in str(caught.value)
    assert decode(generate(single, protocol, seed=3)).ndim == 3
