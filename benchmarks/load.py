"""Load test: thousands of mixed requests against the real tritonserver (`cpu` target), bounded in count
and in time, traffic to 127.0.0.1 only.

    python -m benchmarks.load --requests 3000 --concurrency 1,8,32 --duration-limit 1500 \\
        --out benchmarks/results/load.jsonl
    python -m benchmarks.load --requests 300 --concurrency 8,32          # a short run

The mix (seeded, the same every run): new users (a history never sent before), returning users (one of
a few fixed users, the same request every time) and invalid requests (each of the BAD cases below in
turn, each with the error it must get). `--requests` is the total, shared equally by the concurrency
levels; `--duration-limit` bounds the whole run (requests not started by then are reported as not
sent). Every client call has a deadline (`--timeout`), so nothing can hang.

Every request sent ends in exactly one outcome: succeeded, refused as expected (an invalid request that
got its error), shed (a valid request the server refused at its queue bound with UNAVAILABLE / 503,
`ServingConfig.request_queue_size`), or failed (a valid request that got another error or no answer in
time, an invalid one that got another error or was accepted, a returning user whose image differs
from its answer). The run
HOLDS when nothing failed, the server's own success count for the `pigeon` ensemble grew by exactly the
successes the clients saw, no stub process died, and the server's resident memory (tritonserver and
all its stub processes) grew by less than the bound between the end of the warm-up and the end.

`--deploy-during 0.4 0.6` publishes the checkpoint again as version 2, deploys it once 40% of the
requests have ended and rolls back to version 1 at 60%, as an operator would during traffic; the run
then also needs both switches to succeed, and the end is measured once the old version's processes
have exited (their number back to what it was). A deployment makes Triton reload the ensemble, which
starts its statistics again, so the success count is not compared in such a run (`unchecked`).
Results: one JSON line per run in `--out`; the exit status is 0 when the run held.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIB = 1 << 20
DEFAULT_BOUND_MIB = 64.0
DEFAULT_BOUND_FRACTION = 0.05


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")  # 25 MPixel in a few kB
    return buf.getvalue()


@dataclass
class Request:
    kind: str  # "new", "returning" or "bad:<case>"
    history: list[bytes]
    reference: bytes
    text: str | bytes
    params: dict = field(default_factory=dict)
    expect: str | None = None  # invalid requests: the error text it must get
    raw: dict | None = None  # invalid requests sent below the client: name -> (array, dtype)
    user: int | None = None  # returning users


def _user(seed: int, size: int) -> tuple[list[bytes], bytes, str]:
    from pigeon.data.procedural import render, sample_user

    user = sample_user(np.random.default_rng(seed))
    return (
        [png(render(c, s, size)) for c, s in user.history],
        png(render(*user.reference, size)),
        user.text,
    )


def bad_cases(size: int, max_history: int) -> dict[str, dict]:
    """Invalid requests and the error each must get (a substring of the server's message)."""
    history, reference, _ = _user(0, size)
    good = png(np.full((size, size, 3), 200, np.uint8))
    truncated = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    truncated = truncated[: len(truncated) // 2]
    raw_ok = {
        "history_images": (np.array(history[:2], np.object_), "BYTES"),
        "reference_image": (np.array([reference], np.object_), "BYTES"),
        "text": (np.array([b"a cat"], np.object_), "BYTES"),
    }
    return {
        "undecodable_image": {
            "history": [b"this is not an image"],
            "expect": "history[0]: not a readable image",
        },
        "zero_byte_reference": {"reference": b"", "expect": "reference: not a readable image"},
        "truncated_image": {"history": [truncated], "expect": "history[0]: "},
        "decompression_bomb": {"history": [_bomb()], "expect": "exceeds the limit of"},
        "empty_text": {"text": "", "expect": "text is empty"},
        "overlong_text": {"text": "x" * 5000, "expect": "text has 5000 characters"},
        "nan_guidance": {"params": {"guidance": float("nan")}, "expect": "guidance=nan"},
        "inf_mask_ratio": {
            "params": {"reference_mask_ratio": float("inf")},
            "expect": "reference_mask_ratio=inf must be in [0, 1]",
        },
        "negative_steps": {"params": {"steps": -3}, "expect": "steps=-3 must be an integer"},
        "negative_seed": {"params": {"seed": -1}, "expect": "seed=-1 must be a non-negative"},
        "oversized_history": {
            "history": [good] * (max_history + 1),
            "expect": f"more than the configured maximum of {max_history}",
        },
        "empty_history": {"history": [], "expect": "history is empty"},
        "non_utf8_text": {
            "raw": {**raw_ok, "text": (np.array([b"\xff\xfe caf\xe9"], np.object_), "BYTES")},
            "expect": "text is not valid UTF-8",
        },
        "wrong_dtype": {
            "raw": {**raw_ok, "seed": (np.array([1.5], np.float32), "FP32")},
            "expect": "data-type is 'FP32', but model 'pigeon' expects 'INT64'",
        },
        "wrong_shape": {
            "raw": {**raw_ok, "reference_image": (np.array([[reference, reference]]), "BYTES")},
            "expect": "reference_image",
        },
    }


def make_requests(
    n: int,
    size: int,
    max_history: int,
    seed: int = 0,
    returning_users: int = 4,
    returning_fraction: float = 0.4,
    invalid_fraction: float = 0.15,
) -> list[Request]:
    """`n` requests, shuffled with `seed`: new users, returning users, invalid requests."""
    rng = np.random.default_rng(seed)
    cases = bad_cases(size, max_history)
    returning = [_user(i, size) for i in range(returning_users)]
    n_bad = int(round(n * invalid_fraction))
    n_ret = int(round(n * returning_fraction))
    kinds = ["bad"] * n_bad + ["returning"] * n_ret + ["new"] * (n - n_bad - n_ret)
    rng.shuffle(kinds)
    out, bad_i, new_i = [], 0, 0
    names = list(cases)
    for k in kinds:
        if k == "returning":
            u = int(rng.integers(returning_users))
            h, r, t = returning[u]
            out.append(Request("returning", h, r, t, {"seed": u, "steps": 2}, user=u))
        elif k == "new":
            h, r, t = _user(10_000 + seed * 1_000_003 + new_i, size)
            new_i += 1
            steps = int(rng.integers(1, 4))
            out.append(Request("new", h, r, t, {"seed": int(rng.integers(2**31)), "steps": steps}))
        else:
            name = names[bad_i % len(names)]
            bad_i += 1
            case = cases[name]
            h, r, t = returning[0]
            out.append(
                Request(
                    f"bad:{name}",
                    case.get("history", h),
                    case.get("reference", r),
                    case.get("text", t),
                    {"steps": 1, **case.get("params", {})},
                    expect=case["expect"],
                    raw=case.get("raw"),
                )
            )
    return out


def new_user_requests(
    n: int, size: int, max_history: int, seed: int, steps: int | None = None
) -> list[Request]:
    """`n` valid requests of new users, each with its own seed and the checkpoint's sampling
    settings (`steps` alone overridden where given)."""
    requests = make_requests(
        n, size, max_history, seed, returning_fraction=0.0, invalid_fraction=0.0
    )
    for r in requests:
        r.params = {"seed": r.params["seed"], **({"steps": steps} if steps else {})}
    return requests


def _send(client, request: Request):
    """-> ServedResult; raises ClientError."""
    from tritonclient.utils import InferenceServerException

    from pigeon.serving.client import ClientError

    if request.raw is None:
        return client.generate(request.history, request.reference, request.text, **request.params)
    inputs = [client._input(name, value, dtype) for name, (value, dtype) in request.raw.items()]
    try:
        if client.protocol == "grpc":
            client.client.infer("pigeon", inputs, client_timeout=client.timeout_s)
        else:
            client.client.infer("pigeon", inputs)
    except InferenceServerException as exc:
        raise ClientError(exc.message()) from None
    raise AssertionError("unreachable: an invalid raw request was accepted")


def decode(png_bytes: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"))


def _reason(message: str) -> str:
    """An error message without its variable parts, to count failures by kind."""
    import re

    return re.sub(r"\d+(\.\d+)?", "N", message.split("\n")[0])[:160]


def run_level(
    urls: dict[str, str],
    protocols: list[str],
    concurrency: int,
    requests: list[Request],
    answers: dict[int, np.ndarray],
    image_size: int,
    deadline: float,
    timeout_s: float,
    tolerance: int = 2,
    progress: Progress | None = None,
) -> dict:
    """`concurrency` client threads (alternating between `protocols`, each on its `urls` entry) share
    `requests` until all are sent or `deadline` (time.monotonic) passes; each outcome counts in
    `progress`, which the deployment operator watches."""
    from pigeon.serving.client import ClientError, PigeonClient

    queue = list(reversed(requests))
    lock = threading.Lock()
    outcomes: list[dict] = []

    def worker(protocol: str) -> None:
        with PigeonClient(urls[protocol], protocol, timeout_s=timeout_s) as client:
            while True:
                with lock:
                    if not queue or time.monotonic() >= deadline:
                        return
                    request = queue.pop()
                start = time.perf_counter()
                outcome = {"kind": request.kind, "protocol": protocol}
                try:
                    result = _send(client, request)
                    outcome["latency_s"] = time.perf_counter() - start
                    if request.expect is not None:
                        outcome["outcome"], outcome["reason"] = "failed", "invalid accepted"
                    else:
                        image = decode(result.image_png)
                        if image.shape != (image_size, image_size, 3):
                            outcome["outcome"] = "failed"
                            outcome["reason"] = f"image of shape {image.shape}"
                        elif request.user is not None and (
                            np.abs(image.astype(int) - answers[request.user].astype(int)).max()
                            > tolerance
                        ):
                            outcome["outcome"] = "failed"
                            outcome["reason"] = "returning user's image differs from its answer"
                        else:
                            outcome["outcome"] = "succeeded"
                except ClientError as exc:
                    outcome["latency_s"] = time.perf_counter() - start
                    message = str(exc)
                    if request.expect is not None and request.expect in message:
                        outcome["outcome"] = "refused"
                    elif request.expect is None and is_shed(exc):
                        outcome["outcome"] = "shed"
                    else:
                        outcome["outcome"] = "failed"
                        wrong = f"{request.kind} got another error: " if request.expect else ""
                        outcome["reason"] = wrong + _reason(message)
                except Exception as exc:  # anything else is a failure of the client or server
                    outcome["latency_s"] = time.perf_counter() - start
                    outcome["outcome"] = "failed"
                    outcome["reason"] = f"{exc.__class__.__name__}: {_reason(str(exc))}"
                with lock:
                    outcomes.append(outcome)
                if progress is not None:
                    progress.add()

    from benchmarks.common import run_threads

    assigned = [protocols[i % len(protocols)] for i in range(concurrency)]
    wall = run_threads([functools.partial(worker, protocol) for protocol in assigned])
    return {**summarize(outcomes, len(requests), wall), "_outcomes": outcomes}


class Progress:
    """Requests ended so far in the measured run, shared by the client threads."""

    def __init__(self) -> None:
        self.done = 0
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.done += 1


def operate(server, progress: Progress, total: int, deploy_at: float, rollback_at: float):
    """Deploy version 2 once `deploy_at` of the `total` requests have ended, roll back to version 1
    at `rollback_at`, as an operator would during traffic (`pigeon deploy` / `pigeon rollback`).
    Returns (thread, record): the record gets each action's request count, seconds and outcome."""
    from pigeon.serving.client import deploy, rollback

    record: dict = {}

    def act(name: str, fraction: float, fn) -> bool:
        while progress.done < fraction * total:
            if stop.wait(0.1):
                record[name] = {"error": "the run ended before it"}
                return False
        start = time.perf_counter()
        entry = {"after_requests": progress.done}
        try:
            entry["result"] = fn()
            entry["ok"] = True
        except Exception as exc:  # recorded and checked: a failed switch fails the run
            entry["error"], entry["ok"] = f"{exc.__class__.__name__}: {exc}", False
        entry["seconds"] = time.perf_counter() - start
        entry["requests_during"] = progress.done - entry["after_requests"]
        record[name] = entry
        return entry["ok"]

    def run() -> None:
        url, repo, headers = server.http_url, server.repository, server.admin_headers
        if act("deploy", deploy_at, lambda: deploy(url, repo, 2, headers)):
            act("rollback", rollback_at, lambda: rollback(url, repo, headers))

    stop = threading.Event()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, stop, record


def settle(server, version: int, timeout_s: float = 120.0) -> None:
    """Wait until every live stub process serves `version`: after a switch, the old version's
    processes exit once their last requests end, and memory and process counts are read after."""
    until = time.monotonic() + timeout_s
    while any(s.alive and s.version != version for s in server.stubs()):
        if time.monotonic() > until:
            return  # the check that follows reads what is left
        time.sleep(0.5)


def is_shed(exc) -> bool:
    """The server refused a request at a loop model's queue bound (Triton's dynamic batcher) or at
    admission (`ServingConfig.max_in_flight`)."""
    message = str(exc).lower()
    return exc.status == "UNAVAILABLE" and ("queue" in message or "max_in_flight" in message)


def summarize(outcomes: list[dict], planned: int, wall_s: float) -> dict:
    from benchmarks.common import percentiles

    counts = Counter(o["outcome"] for o in outcomes)
    ok = [o["latency_s"] for o in outcomes if o["outcome"] == "succeeded"]
    refused = [o["latency_s"] for o in outcomes if o["outcome"] == "refused"]
    return {
        "planned": planned,
        "sent": len(outcomes),
        "not_sent": planned - len(outcomes),
        "succeeded": counts["succeeded"],
        "refused_as_expected": counts["refused"],
        "shed": counts["shed"],
        "failed": counts["failed"],
        "failed_reasons": dict(
            Counter(o["reason"] for o in outcomes if o["outcome"] == "failed").most_common()
        ),
        "by_kind": {
            kind: dict(Counter(o["outcome"] for o in outcomes if o["kind"] == kind))
            for kind in sorted({o["kind"] for o in outcomes})
        },
        "latency_s": percentiles(ok) if ok else None,
        "refusal_latency_s": percentiles(refused) if refused else None,
        "throughput_rps": len(outcomes) / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
    }


def run_load(
    server,
    total: int,
    concurrency: list[int],
    *,
    duration_limit_s: float = 1800.0,
    timeout_s: float = 120.0,
    protocols: tuple[str, ...] = ("grpc", "http"),
    seed: int = 0,
    bound_mib: float = DEFAULT_BOUND_MIB,
    bound_fraction: float = DEFAULT_BOUND_FRACTION,
    switch: tuple[float, float] | None = None,
    log=print,
) -> dict:
    """Run the load against a started `TritonServer` (bound to 127.0.0.1); returns the record.
    `switch` (deploy_at, rollback_at): with version 2 published beside 1, deploy it and roll back
    once those shares of the requests have ended."""
    from benchmarks.common import ensemble_counts
    from pigeon.checkpoint import load_config
    from pigeon.serving.client import PigeonClient, deploy

    if server.host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the load test only sends traffic to 127.0.0.1, not {server.host}")
    pipeline = next(server.repository.glob("preprocess/*/pipeline"))
    config = load_config(pipeline)
    size, max_history = config.image_size, config.personalizer.max_history
    deadline = time.monotonic() + duration_limit_s
    memory = {"start": server.memory()}
    url = server.grpc_url
    if switch is not None:  # version 1 on record, so that the rollback has one to go back to
        deploy(server.http_url, server.repository, 1, server.admin_headers)
        settle(server, 1)

    # answers: each returning user's image, alone on an idle server
    requests = make_requests(total, size, max_history, seed)
    returning = {r.user: r for r in requests if r.user is not None}
    answers = {}
    with PigeonClient(url, "grpc", timeout_s=timeout_s) as client:
        for user, r in sorted(returning.items()):
            answers[user] = decode(
                client.generate(r.history, r.reference, r.text, **r.params).image_png
            )
    # warm-up: every kind at the highest concurrency, so memory is measured after the lazy
    # allocations (arenas sized by the largest batches) and the response cache are in place
    warm = make_requests(max(2 * max(concurrency), 16), size, max_history, seed + 7919)
    urls = {"grpc": server.grpc_url, "http": server.http_url}
    warm_level = run_level(
        urls, list(protocols), max(concurrency), warm, answers, size, deadline, timeout_s
    )
    memory["after_warmup"] = server.memory()
    stubs_before = {s.pid for s in server.stubs() if s.alive}
    successes_before = ensemble_counts(url)[0]
    progress = Progress()
    if switch is not None:
        operator, stop, operations = operate(server, progress, total, *switch)
    log(
        f"warm-up: {warm_level['sent']} requests, {warm_level['failed']} failed; server memory "
        f"{memory['after_warmup']['total'] / MIB:.0f} MiB in {memory['after_warmup']['stub_processes']}"
        " stub processes + tritonserver"
    )

    levels = {}
    per_level = [total // len(concurrency)] * len(concurrency)
    per_level[-1] += total - sum(per_level)
    offset = 0
    for c, n in zip(concurrency, per_level, strict=True):
        share = requests[offset : offset + n]
        offset += n
        level = run_level(
            urls, list(protocols), c, share, answers, size, deadline, timeout_s, progress=progress
        )
        level["memory_after"] = server.memory()
        levels[f"c{c}"] = level
        lat = level["latency_s"] or {}
        log(
            f"c={c:<3} sent {level['sent']:>5}  ok {level['succeeded']:>5}  refused "
            f"{level['refused_as_expected']:>4}  shed {level['shed']:>4}  failed "
            f"{level['failed']:>3}  not sent "
            f"{level['not_sent']:>4}  p50 {lat.get('p50', float('nan')) * 1e3:7.1f} ms  p99 "
            f"{lat.get('p99', float('nan')) * 1e3:7.1f} ms  {level['throughput_rps']:6.1f} req/s  "
            f"memory {level['memory_after']['total'] / MIB:.0f} MiB"
        )
    if switch is not None:
        stop.set()
        operator.join()
        log(f"deployment: {json.dumps(operations)}")
        settle(server, 1)  # the rollback's version
    memory["end"] = server.memory()
    successes = ensemble_counts(url)[0] - successes_before
    stubs_after = {s.pid for s in server.stubs() if s.alive}

    everything = [o for level in levels.values() for o in level.pop("_outcomes")]
    total_record = summarize(everything, total, sum(v["wall_s"] for v in levels.values()))
    warm_level.pop("_outcomes")
    growth = memory["end"]["total"] - memory["after_warmup"]["total"]
    bound = bound_mib * MIB + bound_fraction * memory["after_warmup"]["total"]
    checks = {
        "nothing_failed": total_record["failed"] == 0,
        "every_request_has_one_outcome": total_record["sent"]
        == sum(total_record[k] for k in ("succeeded", "refused_as_expected", "shed", "failed")),
        "server_counted_the_same_successes": successes == total_record["succeeded"],
        # a deployment replaces the Python models' processes; then their number must hold
        "no_stub_process_died": (
            len(stubs_after) == len(stubs_before) if switch else stubs_before <= stubs_after
        )
        and not server.heals,
        "memory_growth_within_bound": growth <= bound,
    }
    unchecked = {}
    if switch is not None:
        checks["deployed_and_rolled_back"] = all(
            operations.get(k, {}).get("ok") for k in ("deploy", "rollback")
        )
        del checks["server_counted_the_same_successes"]
        unchecked["server_counted_the_same_successes"] = (
            "a deployment makes Triton reload the ensemble, which starts its statistics again"
        )
    return {
        "benchmark": "load",
        "requests": total,
        "concurrency": concurrency,
        "protocols": list(protocols),
        "duration_limit_s": duration_limit_s,
        "timeout_s": timeout_s,
        "mix": dict(Counter(r.kind.split(":")[0] for r in requests)),
        "invalid_cases": sorted({r.kind[4:] for r in requests if r.kind.startswith("bad:")}),
        "warmup": {
            k: warm_level[k] for k in ("sent", "succeeded", "refused_as_expected", "shed", "failed")
        },
        "levels": levels,
        "total": total_record,
        "server_success_count": successes,
        "memory_bytes": memory,
        "memory_growth_bytes": growth,
        "memory_bound_bytes": int(bound),
        "memory_bound": f"{bound_mib:g} MiB + {bound_fraction:.0%} of the memory after warm-up",
        "deployment": operations if switch is not None else None,
        "checks": checks,
        "unchecked": unchecked,
        "held": all(checks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--requests", type=int, default=3000, help="in all, shared by the levels")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--duration-limit", type=float, default=1800.0, help="seconds, whole run")
    parser.add_argument("--timeout", type=float, default=120.0, help="client deadline, seconds")
    parser.add_argument("--protocols", default="grpc,http", help="workers alternate between them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bound-mib", type=float, default=DEFAULT_BOUND_MIB)
    parser.add_argument("--bound-fraction", type=float, default=DEFAULT_BOUND_FRACTION)
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="serve this checkpoint (e.g. checkpoints/small) instead of a random --preset one",
    )
    parser.add_argument(
        "--deploy-during",
        nargs=2,
        type=float,
        metavar=("DEPLOY_AT", "ROLLBACK_AT"),
        default=None,
        help="publish the checkpoint again as version 2, deploy it once this share of the "
        "requests has ended and roll back to version 1 at the second share (e.g. 0.4 0.6)",
    )
    parser.add_argument("--workdir", default=None, help="default: runs/load-<preset>")
    parser.add_argument("--out", default="benchmarks/results/load.jsonl")
    args = parser.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    protocols = tuple(args.protocols.split(","))
    if args.requests < len(concurrency) or min(concurrency) < 1:
        parser.error("--requests must be at least one per level, each concurrency >= 1")
    if not set(protocols) <= {"grpc", "http"}:
        parser.error(f"--protocols {args.protocols!r}: grpc and/or http")
    switch = tuple(args.deploy_during) if args.deploy_during else None
    if switch and not 0 < switch[0] < switch[1] < 1:
        parser.error(f"--deploy-during {switch}: need 0 < DEPLOY_AT < ROLLBACK_AT < 1")

    from benchmarks.common import (
        append_jsonl,
        checkpoint_and_artifacts,
        environment,
        timestamp,
    )
    from benchmarks.serving import build_repository
    from pigeon.config import ServingConfig
    from pigeon.serving.repository import publish_version
    from pigeon.serving.server import TritonServer

    name = Path(args.checkpoint).name if args.checkpoint else args.preset
    workdir = Path(args.workdir or f"runs/load-{name}")
    checkpoint, artifacts = checkpoint_and_artifacts(args.checkpoint, args.preset, workdir)
    repo = build_repository(checkpoint, artifacts, workdir / "repo", "default", ServingConfig())
    if switch and not (repo / "pigeon" / "2").exists():
        publish_version(repo, checkpoint, artifacts, 2)
    record = {
        "time": timestamp(),
        "env": environment(),
        "preset": args.preset,
        "checkpoint": str(checkpoint) if args.checkpoint else None,
    }
    with TritonServer(repo, log_file=workdir / "tritonserver.log") as server:
        record.update(
            run_load(
                server,
                args.requests,
                concurrency,
                duration_limit_s=args.duration_limit,
                timeout_s=args.timeout,
                protocols=protocols,
                seed=args.seed,
                bound_mib=args.bound_mib,
                bound_fraction=args.bound_fraction,
                switch=switch,
            )
        )
    append_jsonl(args.out, record)
    total, mem = record["total"], record["memory_bytes"]
    print(json.dumps({"total": total, "checks": record["checks"]}, indent=2))
    print(
        f"sent {total['sent']} of {total['planned']}: {total['succeeded']} succeeded, "
        f"{total['refused_as_expected']} refused as expected, {total['shed']} shed at the queue "
        f"bound, {total['failed']} failed; server "
        f"memory {mem['after_warmup']['total'] / MIB:.0f} -> {mem['end']['total'] / MIB:.0f} MiB "
        f"(bound +{record['memory_bound_bytes'] / MIB:.0f} MiB); "
        + ("HELD" if record["held"] else "DID NOT HOLD")
    )
    return 0 if record["held"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
