"""Where the CPU goes when Triton serves one user at a time, against the same requests in process.

    PYTHONPATH=. python -m benchmarks.serving_cpu

On the `small` preset's benchmark checkpoint (runs/bench-small, built by benchmarks.serving): first the
served level's 16 requests in process (ONNX Runtime with the serving options), per-stage p50 and CPU
cores used; then the default server: CPU seconds per process while idle for 10 s, and while serving
the same 16 requests sequentially. A diagnostic behind benchmarks/README.md; it appends nothing.
"""

import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import prepare
from benchmarks.serving import build_repository, run_level, user_request
from pigeon.config import ServingConfig
from pigeon.serving.server import TritonServer


def in_process() -> None:
    import resource

    from pigeon.checkpoint import load_checkpoint
    from pigeon.core.images import load_image
    from pigeon.inference.pipeline import GenerationRequest, PigeonPipeline
    from pigeon.inference.runners import OrtOptions, OrtRunner

    checkpoint, artifacts = prepare("small", Path("runs/bench-small"))
    ckpt = load_checkpoint(checkpoint)
    runner = OrtRunner.from_artifacts(
        artifacts, ckpt.config, OrtOptions.from_serving(ServingConfig())
    )
    pipe = PigeonPipeline(ckpt.config, ckpt.tokenizer, runner)
    requests = []
    for i in range(16):
        u = user_request(64, i, True)
        requests.append(
            GenerationRequest(
                history=[load_image(h) for h in u["history"]],
                reference=load_image(u["reference"]),
                text=u["text"],
                seed=i,
                steps=25,
            )
        )
    pipe(requests[0])
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.time()
    timings = [pipe(r)[0].timings for r in requests]
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.time() - start
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    p50 = {
        k: float(np.median([t[k] for t in timings])) * 1e3
        for k in ("personalize", "denoise", "total")
    }
    print(f"in process: {wall:.1f} s, {cpu / wall:.2f} cores; p50 ms {p50}")


def procs(root_pid):
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().split()
            cmd = (d / "cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        out[int(d.name)] = (
            int(stat[3]),
            (int(stat[13]) + int(stat[14])) / os.sysconf("SC_CLK_TCK"),
            cmd,
        )
    keep, frontier = {}, {root_pid}
    while frontier:
        nxt = set()
        for pid, (ppid, cpu, cmd) in out.items():
            if ppid in frontier and pid not in keep:
                keep[pid] = (cpu, cmd)
                nxt.add(pid)
        frontier = nxt
    keep[root_pid] = (out[root_pid][1], out[root_pid][2])
    return keep


def served() -> None:
    workdir = Path("runs/bench-small")
    checkpoint, artifacts = prepare("small", workdir)
    repo = build_repository(checkpoint, artifacts, workdir / "repo", "default", ServingConfig())
    with TritonServer(repo) as server:
        reqs = [user_request(64, i, True) for i in range(16)]
        run_level(server.grpc_url, "grpc", 1, reqs[:2], 25, 300)
        time.sleep(5)
        root = server.process.pid
        a = procs(root)
        t0 = time.time()
        time.sleep(10)
        b = procs(root)
        idle = time.time() - t0
        print(f"idle {idle:.1f}s: CPU s by process")
        groups = {}
        for pid, (cpu, cmd) in b.items():
            key = (
                cmd.split("triton_python_backend_stub")[-1].split()[0:1]
                if "stub" in cmd
                else ["tritonserver"]
            )
            groups[" ".join(key)[-60:]] = (
                groups.get(" ".join(key)[-60:], 0) + cpu - a.get(pid, (cpu,))[0]
            )
        for k, v in sorted(groups.items(), key=lambda x: -x[1])[:12]:
            print(f"  {v:6.2f}  {k}")
        a = procs(root)
        t0 = time.time()
        level = run_level(server.grpc_url, "grpc", 1, reqs, 25, 300)
        b = procs(root)
        wall = time.time() - t0
        print(
            f"busy {wall:.1f}s, {level['completed']} requests, "
            f"p50 {level['latency_s']['p50'] * 1e3:.0f} ms: CPU s by process"
        )
        groups = {}
        for pid, (cpu, cmd) in b.items():
            key = (
                cmd.split("triton_python_backend_stub")[-1].split()[0:1]
                if "stub" in cmd
                else ["tritonserver"]
            )
            groups[" ".join(key)[-60:]] = (
                groups.get(" ".join(key)[-60:], 0) + cpu - a.get(pid, (cpu,))[0]
            )
        total = sum(groups.values())
        print(f"  total {total:.1f} CPU s = {total / wall:.2f} cores")
        for k, v in sorted(groups.items(), key=lambda x: -x[1])[:14]:
            print(f"  {v:6.2f}  {k}")


if __name__ == "__main__":
    in_process()
    served()
