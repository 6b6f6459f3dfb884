"""Overload: at several times its measured capacity the server refuses the excess at once and keeps
the latency of the requests it accepts near the unloaded latency, rather than letting every request
get slow. Real tritonserver (`cpu` target), traffic to 127.0.0.1 only.

    python -m benchmarks.overload --checkpoint checkpoints/small --factor 4 --seconds 60 \\
        --out benchmarks/results/overload.jsonl

In one run, on one server:
1. unloaded: `--unloaded` requests one after another -> their p50 / p99;
2. capacity: a closed loop at concurrency `--instances` (none waits, none is refused) for `--seconds`
   -> requests per second;
3. overload: open-loop arrivals at `--factor` x that rate for `--seconds` (one thread per request, a
   fixed interval, so the offered load does not slow down when the server does).
Each overload request ends served, or refused at a loop model's queue bound (UNAVAILABLE / 503), or
failed. The goals (docs/RELIABILITY.md, "Backpressure"): refusals within 100 ms (p99), accepted p99
within twice the unloaded p99. The server runs `--instances` instances of each loop model and lets
`--queue` requests wait for each (`ServingConfig.request_queue_size`): a request's wait is about the
queue bound over the throughput, so a latency promise sets the bound. `--max-in-flight N` admits at
most N requests into the two loops at once (`ServingConfig.max_in_flight`) and refuses the rest at
preprocess, so that the accepted ones run as they would unloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from pathlib import Path

MIB = 1 << 20
REFUSAL_GOAL_S = 0.100
ACCEPTED_GOAL_RATIO = 2.0


def send(client, request) -> tuple[str, float]:
    """("served" | "shed" | "failed: <why>", seconds) of one request."""
    from benchmarks.load import _send, is_shed
    from pigeon.serving.client import ClientError

    start = time.perf_counter()
    try:
        _send(client, request)
        return "served", time.perf_counter() - start
    except ClientError as exc:
        seconds = time.perf_counter() - start
        return ("shed" if is_shed(exc) else f"failed: {str(exc)[:120]}"), seconds


def closed_loop(url: str, requests: list, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients, each sending its next request when the last one ends."""
    from benchmarks.common import run_threads
    from pigeon.serving.client import PigeonClient

    queue, lock, outcomes = list(reversed(requests)), threading.Lock(), []
    stop = time.monotonic() + seconds

    def worker() -> None:
        with PigeonClient(url, "grpc", timeout_s=120) as client:
            while time.monotonic() < stop:
                with lock:
                    if not queue:
                        return
                    request = queue.pop()
                outcome = send(client, request)
                with lock:
                    outcomes.append(outcome)

    wall = run_threads([worker] * concurrency)
    served = sum(1 for o, _ in outcomes if o == "served")
    return {"sent": len(outcomes), "served": served, "wall_s": wall, "rps": served / wall}


def open_loop(url: str, requests: list, rate: float, seconds: float) -> list[tuple[str, float]]:
    """Requests sent at `rate` per second for `seconds`, each from its own thread and client."""
    from pigeon.serving.client import PigeonClient

    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def one(request) -> None:
        with PigeonClient(url, "grpc", timeout_s=120) as client:
            outcome = send(client, request)
        with lock:
            outcomes.append(outcome)

    threads, start = [], time.perf_counter()
    n = min(len(requests), int(rate * seconds))
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=one, args=(requests[i],))
        thread.start()
        threads.append(thread)
    for t in threads:
        t.join()
    return outcomes


def run_overload(
    server,
    steps: int | None,
    factor: float,
    seconds: float,
    unloaded: int,
    instances: int,
    log=print,
) -> dict:
    from benchmarks.common import percentiles
    from benchmarks.load import new_user_requests
    from pigeon.serving.client import PigeonClient

    config = server.served_config()
    size, max_history = config.image_size, config.personalizer.max_history

    def fresh(n: int, seed: int) -> list:
        return new_user_requests(n, size, max_history, seed, steps)

    url = server.grpc_url
    with PigeonClient(url, "grpc", timeout_s=120) as client:  # warm-up: lazy allocations
        for r in fresh(4, 1):
            send(client, r)
        alone = [send(client, r) for r in fresh(unloaded, 2)]
    alone_s = [s for o, s in alone if o == "served"]
    base = percentiles(alone_s)
    log(f"unloaded: p50 {base['p50'] * 1e3:.0f} ms, p99 {base['p99'] * 1e3:.0f} ms")
    # capacity: one request per loop instance at a time, so none waits and none is refused (a
    # closed loop past that is refused at once and its clients spin); the pool ends the loop early,
    # with the rate still right, if the server is faster than 20 requests a second
    capacity = closed_loop(url, fresh(int(20 * seconds) + 10, 3), instances, seconds)
    rate = factor * capacity["rps"]
    log(f"capacity: {capacity['rps']:.2f} req/s; offering {rate:.2f} req/s for {seconds:g} s")
    outcomes = open_loop(url, fresh(int(rate * seconds) + 1, 4), rate, seconds)
    served = [s for o, s in outcomes if o == "served"]
    shed = [s for o, s in outcomes if o == "shed"]
    failed = [o for o, _ in outcomes if o.startswith("failed")]
    record = {
        "unloaded_s": base,
        "capacity": capacity,
        "offered_rps": rate,
        "sent": len(outcomes),
        "served": len(served),
        "shed": len(shed),
        "failed": len(failed),
        "failed_reasons": sorted(set(failed))[:5],
        "served_s": percentiles(served) if served else None,
        "shed_s": percentiles(shed) if shed else None,
    }
    record["accepted_p99_over_unloaded_p99"] = (
        record["served_s"]["p99"] / base["p99"] if served else None
    )
    record["goals"] = {
        "refusals_within_100ms_p99": bool(shed) and record["shed_s"]["p99"] <= REFUSAL_GOAL_S,
        "accepted_p99_within_2x_unloaded": bool(served)
        and record["accepted_p99_over_unloaded_p99"] <= ACCEPTED_GOAL_RATIO,
        "nothing_failed": not failed,
    }
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=None, help="default: random weights of --preset")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--factor", type=float, default=4.0, help="offered load / capacity")
    parser.add_argument("--seconds", type=float, default=60.0, help="capacity and overload phases")
    parser.add_argument("--unloaded", type=int, default=30, help="requests one after another")
    parser.add_argument("--steps", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--instances", type=int, default=1, help="of each loop model")
    parser.add_argument("--queue", type=int, default=1, help="request_queue_size per loop model")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="ServingConfig.max_in_flight: requests admitted into the loops at once (0: no limit; "
        "default: the serving.json's)",
    )
    parser.add_argument(
        "--serving",
        default=None,
        help="serving.json (ServingConfig) to start from; --instances, --queue and "
        "--max-in-flight override it",
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default="benchmarks/results/overload.jsonl")
    args = parser.parse_args(argv)
    if args.factor <= 1 or args.seconds <= 0 or args.unloaded < 2 or args.queue < 1:
        parser.error("--factor > 1, --seconds > 0, --unloaded >= 2, --queue >= 1")

    from benchmarks.common import append_jsonl, checkpoint_and_artifacts, environment, timestamp
    from benchmarks.serving import build_repository
    from pigeon.config import ServingConfig, load_json
    from pigeon.serving.server import TritonServer

    name = Path(args.checkpoint).name if args.checkpoint else args.preset
    workdir = Path(args.workdir or f"runs/overload-{name}")
    checkpoint, artifacts = checkpoint_and_artifacts(args.checkpoint, args.preset, workdir)
    serving = dataclasses.replace(
        load_json(ServingConfig, args.serving) if args.serving else ServingConfig(),
        bls_instances=args.instances,
        request_queue_size=args.queue,
    )
    if args.max_in_flight is not None:
        serving = dataclasses.replace(serving, max_in_flight=args.max_in_flight)
    repo = build_repository(checkpoint, artifacts, workdir / "repo", "default", serving)
    record = {
        "benchmark": "overload",
        "time": timestamp(),
        "env": environment(),
        "checkpoint": str(checkpoint),
        "factor": args.factor,
        "seconds": args.seconds,
        "instances": args.instances,
        "queue": args.queue,
        "serving": dataclasses.asdict(serving),
        "steps": args.steps,
    }
    with TritonServer(repo, log_file=workdir / "tritonserver.log") as server:
        record.update(
            run_overload(
                server, args.steps, args.factor, args.seconds, args.unloaded, args.instances
            )
        )
    append_jsonl(args.out, record)
    served, shed = record["served_s"] or {}, record["shed_s"] or {}
    print(
        f"offered {record['offered_rps']:.2f} req/s ({args.factor:g} x {record['capacity']['rps']:.2f}"
        f"): {record['served']} served, {record['shed']} refused, {record['failed']} failed; "
        f"refusal p99 {shed.get('p99', float('nan')) * 1e3:.0f} ms (goal 100); accepted p99 "
        f"{served.get('p99', float('nan')) * 1e3:.0f} ms = "
        f"{record['accepted_p99_over_unloaded_p99'] or float('nan'):.2f} x unloaded p99 "
        f"{record['unloaded_s']['p99'] * 1e3:.0f} ms (goal 2)"
    )
    print(json.dumps(record["goals"]))
    return 0 if all(record["goals"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
