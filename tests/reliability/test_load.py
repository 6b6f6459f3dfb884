"""Load on the real server: mixed good and bad requests, every one exactly one outcome, nothing lost."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from .support import (
    ROOT,
    TIMEOUT_S,
)


def test_load_of_mixed_requests_loses_nothing(served, tmp_path):
    from benchmarks.common import append_jsonl
    from benchmarks.load import run_load

    record = run_load(served, 300, [8, 32], duration_limit_s=1800, timeout_s=TIMEOUT_S, log=print)
    append_jsonl(tmp_path / "load.jsonl", record)
    total = record["total"]
    assert total["failed"] == 0, total["failed_reasons"]
    assert total["sent"] == 300 and total["not_sent"] == 0
    assert total["refused_as_expected"] == record["mix"]["bad"]
    # at concurrency 32 the default queue bound (32 waiting per loop model) sheds nothing
    assert total["shed"] == 0
    assert total["succeeded"] == record["mix"]["new"] + record["mix"]["returning"]
    assert record["checks"] == {k: True for k in record["checks"]}, record["checks"]
    assert record["held"]
    print(json.dumps({k: record[k] for k in ("total", "memory_bytes", "checks")}, indent=1))


def run_tool(module: str, tmp_path, args: list[str], timeout_s: int):
    """`python -m benchmarks.<module>` as a user runs it, with its own work folder and results file;
    returns (the process, its JSON line)."""
    out = tmp_path / f"{module}.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args]
        + ["--workdir", str(tmp_path / "w"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    return res, json.loads(out.read_text().splitlines()[-1])


def run_load_tool(tmp_path, requests: int, concurrency: str, limit_s: int, *extra: str) -> dict:
    """`python -m benchmarks.load`; it must exit 0 (the run held)."""
    args = ["--requests", str(requests), "--concurrency", concurrency]
    args += ["--duration-limit", str(limit_s), *extra]
    res, record = run_tool("load", tmp_path, args, limit_s + 400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return record


def test_load_tool_runs_end_to_end_through_a_deployment_and_a_rollback(tmp_path):
    """The standalone tool, CI-sized: its own repository build, server, mix and checks, with
    version 2 deployed after 30% of the requests and rolled back after 70%; no request fails
    across either switch, and the versions' record ends where it began."""
    record = run_load_tool(tmp_path, 60, "1,4", 300, "--deploy-during", "0.3", "0.7")
    assert record["held"] and record["total"]["sent"] == 60 and record["total"]["failed"] == 0
    deploy, rollback = record["deployment"]["deploy"], record["deployment"]["rollback"]
    assert deploy["ok"] and rollback["ok"], record["deployment"]
    assert 18 <= deploy["after_requests"] < rollback["after_requests"] <= 60
    assert rollback["result"] == 1  # the version served before the deployment
    versions = json.loads(
        (tmp_path / "w" / "repo" / "cpu-default" / ".deployments.json").read_text()
    )
    assert versions["versions"] == [1]


@pytest.mark.slow
def test_long_load_run_holds(tmp_path):
    """The standalone tool at its documented size (thousands of requests, concurrency 1, 8, 32)."""
    record = run_load_tool(tmp_path, 3000, "1,8,32", 3600)
    assert record["held"] and record["total"]["sent"] == 3000 and record["total"]["failed"] == 0


@pytest.mark.parametrize("max_in_flight", [0, 1])
def test_overload_tool_refuses_the_excess_and_serves_the_rest(tmp_path, max_in_flight):
    """`python -m benchmarks.overload`, CI-sized: at 4x the measured capacity with one instance and
    a queue of one per loop model, without and with admission, every request is served or refused
    (at the queue bound or at admission; none failed) and some are refused. Its latency goals are
    measured, not asserted here."""
    args = ["--seconds", "6", "--unloaded", "5", "--steps", "8"]
    args += ["--max-in-flight", str(max_in_flight)]
    res, record = run_tool("overload", tmp_path, args, 900)
    assert record["serving"]["max_in_flight"] == max_in_flight
    assert record["failed"] == 0, record["failed_reasons"]
    assert record["sent"] == record["served"] + record["shed"] > 0
    assert record["shed"] > 0 and record["served"] > 0, res.stdout[-2000:]
    assert res.returncode in (0, 1)  # 1: a latency goal missed, which the record says


def test_cold_start_tool_warms_one_server_and_not_the_other(tmp_path):
    """`python -m benchmarks.cold_start`, CI-sized: two fresh servers, the same requests, one warmed
    up by `TritonServer.warm_up` first. Its ratios are measured, not asserted here."""
    res, record = run_tool("cold_start", tmp_path, ["--requests", "3"], 900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cold, warm = record["no warm-up"], record["warm-up"]
    assert cold["warm_up_s"] is None and warm["warm_up_s"] > 0
    assert len(cold["seconds"]) == len(warm["seconds"]) == 3
    for mode in (cold, warm):  # the reported ratio is the first request over the median of the rest
        assert mode["first_s"] == mode["seconds"][0]
        assert mode["median_rest_s"] == statistics.median(mode["seconds"][1:])
        assert mode["first_over_rest"] == mode["seconds"][0] / mode["median_rest_s"]
