"""Admission slots (pigeon.serving.in_flight): at most `limit` holders across processes, slots
given back by token, a lost slot reclaimed after its lease; the config that turns it on."""

from __future__ import annotations

import multiprocessing

import pytest

from pigeon.config import MAX_IN_FLIGHT, ConfigError, ServingConfig, from_dict, preset, to_dict
from pigeon.serving.in_flight import InFlightSlots, ServerBusy, slots_path
from pigeon.serving.triton_config import repository_configs


@pytest.fixture
def slots(tmp_path):
    return InFlightSlots(tmp_path / "slots")


def test_at_most_limit_holders_and_a_released_slot_is_taken_again(slots):
    tokens = [slots.acquire(3, lease_s=60, now=100.0) for _ in range(3)]
    assert len(set(tokens)) == 3 and 0 not in tokens
    assert slots.held(now=100.0) == 3
    with pytest.raises(ServerBusy, match=r"limit of 3 requests in flight \(max_in_flight\)"):
        slots.acquire(3, lease_s=60, now=100.0)
    slots.release(tokens[1])
    slots.release(tokens[1])  # twice: the second finds nothing, changes nothing
    slots.release(0)  # no limit's token
    assert slots.held(now=100.0) == 2
    again = slots.acquire(3, lease_s=60, now=100.0)
    assert again not in tokens
    with pytest.raises(ServerBusy):
        slots.acquire(3, lease_s=60, now=100.0)
    # a larger limit (a redeploy raised it) sees the same held slots and has room for one more
    slots.acquire(4, lease_s=60, now=100.0)
    assert slots.held(now=100.0) == 4


def test_a_slot_whose_request_vanished_frees_itself_when_its_lease_ends(slots):
    lost = slots.acquire(1, lease_s=2.0, now=100.0)
    with pytest.raises(ServerBusy):
        slots.acquire(1, lease_s=2.0, now=101.9)
    assert slots.held(now=102.1) == 0
    taken_over = slots.acquire(1, lease_s=2.0, now=102.1)
    slots.release(lost)  # the lost request's late release must not free its successor's slot
    assert slots.held(now=102.5) == 1 and taken_over != lost


def _contend(path, barrier, results) -> None:
    barrier.wait()
    try:
        results.put(InFlightSlots(path).acquire(3, lease_s=60))
    except ServerBusy:
        results.put(0)


def test_processes_racing_for_slots_get_exactly_limit_of_them(tmp_path):
    context = multiprocessing.get_context("fork")
    n = 12
    barrier, results = context.Barrier(n), context.Queue()
    workers = [
        context.Process(target=_contend, args=(tmp_path / "slots", barrier, results))
        for _ in range(n)
    ]
    for w in workers:
        w.start()
    got = [results.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(60)
    won = [t for t in got if t]
    assert len(won) == 3 and len(set(won)) == 3, got


def test_limits_out_of_range_are_named(slots):
    with pytest.raises(ValueError, match="limit=0"):
        slots.acquire(0, lease_s=1)
    for bad in (-1, MAX_IN_FLIGHT + 1):
        with pytest.raises(ConfigError, match=f"serving.max_in_flight={bad}"):
            ServingConfig(max_in_flight=bad)
    with pytest.raises(ConfigError, match="serving.in_flight_lease_ms=0"):
        ServingConfig(in_flight_lease_ms=0)


def test_a_serving_json_without_the_fields_has_no_limit():
    serving = to_dict(ServingConfig(max_in_flight=4, in_flight_lease_ms=5))
    del serving["max_in_flight"], serving["in_flight_lease_ms"]
    assert from_dict(ServingConfig, serving) == ServingConfig()


def test_each_repository_has_its_own_slots(tmp_path):
    assert slots_path(tmp_path / "a") != slots_path(tmp_path / "b")
    assert slots_path(tmp_path / "a") == slots_path(tmp_path / "x" / ".." / "a")


def test_only_a_limit_gives_preprocess_its_parameters():
    config = preset("tiny")
    assert "max_in_flight" not in repository_configs(config, ServingConfig(), "cpu")["preprocess"]
    limited = repository_configs(config, ServingConfig(max_in_flight=2), "cpu")["preprocess"]
    assert 'key: "max_in_flight"\n    value: { string_value: "2" }' in limited
    assert 'key: "in_flight_lease_ms"\n    value: { string_value: "60000" }' in limited
