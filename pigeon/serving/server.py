"""Start the real `tritonserver` (from the `nvidia-pytriton` wheel) on a model repository.

What the binary needs on a CPU machine: a backend directory whose
`python/` folder holds the Python backend library, its utils module and the stub for this Python
version; this virtual environment's `bin` first on PATH (the stub finds its interpreter there, and its
numpy must be < 2); the wheel's libraries and this interpreter's LIBDIR on LD_LIBRARY_PATH; the cache
directory for the response cache. It binds 127.0.0.1 unless told otherwise, and loads models
explicitly, so versions switch through the model-control API without a restart.

Reliability (docs/RELIABILITY.md):
- `admin_header=("admin-key", secret)` restricts the APIs that change the server (model load/unload,
  shared memory, trace, logging) on HTTP and gRPC to requests carrying that header; inference,
  health and metadata stay open.
- A supervisor thread (`supervise_s`) watches the Python-backend stub processes. When one dies
  (killed, out of memory), tritonserver 2.51 keeps reporting the model READY and fails every request
  that reaches the dead instance ("Stub process ... is not healthy"), and never restarts it
  (triton-inference-server/server#8604); the supervisor reloads that model on the version it was
  serving, which starts fresh stubs.
- `stop()` drains first: it unloads the ensemble, which waits for the requests in flight to finish
  (a plain SIGTERM fails them: their BLS calls into the networks are refused as the server shuts
  down), then sends SIGTERM, then SIGKILL after a timeout.

    with TritonServer("triton_models", models=["pigeon"]) as server:
        print(server.http_url)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """tritonserver could not be found, started or reached; the message says which and why."""


# --- processes (Linux /proc: the only platform the tritonserver wheel exists for) ----------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return fields[0], int(fields[1])


def child_pids(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat and stat[1] == pid:
                children.append(int(entry.name))
    return children


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 when it is gone)."""
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub process: an instance of `model` at `version`."""

    pid: int
    model: str
    version: int
    instance: str
    alive: bool  # False: exited (a zombie tritonserver has not reaped)


def stub_processes(server_pid: int) -> list[Stub]:
    stubs = []
    for pid in child_pids(server_pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not args or not args[0].endswith(b"triton_python_backend_stub") or len(args) < 10:
            continue
        model_py = Path(os.fsdecode(args[1]))  # <repository>/<model>/<version>/model.py
        stat = _stat(pid)
        stubs.append(
            Stub(
                pid,
                model_py.parent.parent.name,
                int(model_py.parent.name) if model_py.parent.name.isdigit() else 0,
                os.fsdecode(args[8]),
                stat is not None and stat[0] not in ("Z", "X"),
            )
        )
    return stubs


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise ServerError(
            "the Triton server comes with `nvidia-pytriton`; install the serving "
            "extra: pip install -e '.[serving]'"
        ) from exc
    return Path(pytriton.__file__).parent / "tritonserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_directory(root: Path, into: Path) -> Path:
    """`into/python/` with the Python backend and the stub for this interpreter (symlinks)."""
    python = into / "python"
    python.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"no Triton Python backend stub for Python {version} in {stub.parent}")
    for source, name in (
        (root / "backends" / "python" / "libtriton_python.so", None),
        (root / "backends" / "python" / "triton_python_backend_utils.py", None),
        (stub, None),
    ):
        link = python / (name or source.name)
        if not link.exists():
            link.symlink_to(source)
    return into


def server_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libs = [str(root.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class TritonServer:
    repository: str | Path
    models: list[str] = field(default_factory=lambda: ["*"])  # explicit mode: load these
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: a free port
    grpc_port: int = 0
    metrics_port: int = 0
    cache_bytes: int = 64 * 1024 * 1024
    startup_timeout_s: float = 120.0
    log_file: str | Path | None = None
    extra_args: list[str] = field(default_factory=list)
    admin_header: tuple[str, str] | None = None  # (header, value) required by the admin APIs
    supervise_s: float | None = 2.0  # stub watch interval; None: no supervisor
    drain_models: tuple[str, ...] = ("pigeon",)  # unloaded first by stop(): in-flight finish

    def __post_init__(self) -> None:
        self.repository = Path(self.repository).resolve()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._expected: dict[tuple[str, int], int] = {}  # stub processes per READY version
        self.heals: list[dict] = []  # what the supervisor reloaded, and why
        if self.admin_header is not None:
            key, value = self.admin_header
            if not re.fullmatch(r"[A-Za-z0-9-]+", key) or not value or re.search(r"[\s,:=]", value):
                raise ServerError(
                    f"admin_header={key!r}: the header name must be letters, digits and '-', "
                    "the value non-empty without spaces, ',', ':' or '='"
                )

    @property
    def admin_headers(self) -> dict[str, str] | None:
        """The headers deploy/rollback need on this server (None when the admin APIs are open)."""
        return dict([self.admin_header]) if self.admin_header else None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path, root: Path) -> list[str]:
        args = [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--cache-directory={root / 'caches'}",
            f"--cache-config=local,size={self.cache_bytes}",
            "--model-control-mode=explicit",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]
        if self.admin_header is not None:
            key, value = self.admin_header
            apis = "model-repository,shared-memory,trace,logging"
            args += [
                f"--http-restricted-api={apis}:{key}={value}",
                f"--grpc-restricted-protocol={apis}:{key}={value}",
            ]
        return args + [f"--load-model={m}" for m in self.models] + self.extra_args

    def start(self) -> TritonServer:
        if not (self.repository.is_dir()):
            raise ServerError(f"{self.repository}: model repository not found")
        root = pytriton_root()
        self._tmp = tempfile.TemporaryDirectory(prefix="pigeon-triton-")
        backend_dir = backend_directory(root, Path(self._tmp.name) / "backends")
        log_path = Path(self.log_file or Path(self._tmp.name) / "tritonserver.log")
        self._log = open(log_path, "w")
        self.log_path = log_path
        self.process = subprocess.Popen(
            self.command(backend_dir, root),
            env=server_env(root),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready()
        self._stopping.clear()
        if self.supervise_s:
            self._supervisor = threading.Thread(
                target=self._supervise, name="pigeon-triton-supervisor", daemon=True
            )
            self._supervisor.start()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop(drain=False)  # closes the log, removes the temporary folder
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode}:\n{tail}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        tail = self.log_tail()  # before stop() removes the log's folder
        self.stop(drain=False)
        raise ServerError(f"tritonserver not ready after {self.startup_timeout_s:.0f}s:\n{tail}")

    def served_config(self) -> Any:
        """The pipeline config of the checkpoint the repository serves (preprocess's copy)."""
        from pigeon.checkpoint import load_config

        return load_config(next(self.repository.glob("preprocess/*/pipeline")))

    def warm_up(self, requests: int = 1) -> float:
        """Send `requests` small synthetic generations through the `pigeon` ensemble and wait for
        them; returns the seconds taken. The first request after a start pays for every Python
        model's first calls (BLS connections, lazy imports, first allocations): 1.4-1.8 times the
        next ones on `checkpoints/small` here (benchmarks/README.md, "Warm-up"). Triton's
        `model_warmup` cannot take it over: an ensemble may not declare one, and BLS does not run
        in a Python model's `initialize`."""
        import numpy as np

        from pigeon.core.images import encode_png
        from pigeon.serving.client import PigeonClient

        config = self.served_config()
        image = np.full((config.image_size,) * 2 + (3,), 255, np.uint8)
        image[config.image_size // 4 : -config.image_size // 4, config.image_size // 4 :] = 200
        png = encode_png(image)  # a grey block on white: any valid request does
        # a full history, as most users send: the history's networks run at its shapes
        history = [png] * config.personalizer.max_history
        start = time.perf_counter()
        with PigeonClient(self.grpc_url, "grpc", timeout_s=self.startup_timeout_s) as client:
            for seed in range(requests):
                client.generate(history, png, "warm-up", seed=seed)
        return time.perf_counter() - start

    def log_tail(self, lines: int = 30) -> str:
        """The log's error lines (they name what failed, e.g. a model folder without a config),
        then its last lines."""
        try:
            text = self.log_path.read_text().splitlines()
        except OSError:
            return "(no log)"
        errors = [
            line
            for line in text[:-lines]
            if line.startswith("E") and "Cuda" not in line and "CUDA" not in line
        ]
        return "\n".join(errors[:20] + text[-lines:])

    # --- supervision ------------------------------------------------------------------------

    def _admin_client(self, timeout_s: float = 60.0):
        import tritonclient.http as http

        return http.InferenceServerClient(
            self.http_url, connection_timeout=timeout_s, network_timeout=timeout_s
        )

    def stubs(self) -> list[Stub]:
        return stub_processes(self.process.pid) if self.process else []

    def memory(self) -> dict[str, int]:
        """Resident bytes of tritonserver and of its live stub processes."""
        if self.process is None or self.process.poll() is not None:
            return {"server": 0, "stubs": 0, "total": 0, "stub_processes": 0}
        stubs = [s for s in self.stubs() if s.alive]
        server, children = rss_bytes(self.process.pid), sum(rss_bytes(s.pid) for s in stubs)
        return {
            "server": server,
            "stubs": children,
            "total": server + children,
            "stub_processes": len(stubs),
        }

    def heal(self) -> list[str]:
        """Reload every READY Python-backend model that has fewer live stub processes than its
        configured instances, on the version it serves. Returns the models reloaded."""
        if self.process is None or self.process.poll() is not None:
            return []
        from pigeon.serving.client import loaded_versions

        client = self._admin_client()
        healed = []
        try:
            ready = loaded_versions(client, self.admin_headers)
            alive: dict[tuple[str, int], int] = {}
            for stub in self.stubs():  # a killed stub is a zombie (no command line) or gone
                if stub.alive:
                    alive[(stub.model, stub.version)] = alive.get((stub.model, stub.version), 0) + 1
            for model, version in sorted(ready.items()):
                key = (model, version)
                if key not in self._expected:  # instances of a Python-backend model, else 0
                    config = client.get_model_config(model, headers=self.admin_headers)
                    groups = config.get("instance_group", [])
                    python = config.get("backend") == "python"
                    self._expected[key] = (
                        sum(int(g.get("count", 1)) for g in groups) if python else 0
                    )
                expected = self._expected[key]
                if alive.get(key, 0) >= expected:
                    continue
                log.warning(
                    "%s version %d: %d of %d stub processes alive; reloading it",
                    model,
                    version,
                    alive.get(key, 0),
                    expected,
                )
                config = client.get_model_config(model, headers=self.admin_headers)
                config["version_policy"] = {"specific": {"versions": [version]}}
                # a changed parameter makes Triton reload the same version (new instances)
                config.setdefault("parameters", {})["pigeon_restart"] = {
                    "string_value": str(time.time_ns())
                }
                client.load_model(model, config=json.dumps(config), headers=self.admin_headers)
                self.heals.append(
                    {
                        "model": model,
                        "version": version,
                        "alive": alive.get(key, 0),
                        "expected": expected,
                        "time": time.time(),
                    }
                )
                healed.append(model)
        finally:
            client.close()
        return healed

    def _supervise(self) -> None:
        while not self._stopping.wait(self.supervise_s):
            try:
                self.heal()
            except Exception as exc:  # the supervisor must outlive a failed check; it retries
                log.warning("supervisor check failed: %s", exc)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Unload the entry models: Triton refuses new requests for them and waits for those in
        flight. Best effort (a hung server is stopped anyway)."""
        from tritonclient.utils import InferenceServerException

        client = self._admin_client(timeout_s)
        try:
            for model in self.drain_models:
                client.unload_model(model, headers=self.admin_headers)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                index = client.get_model_repository_index(headers=self.admin_headers)
                if not any(
                    m["name"] in self.drain_models and m.get("state") in ("READY", "UNLOADING")
                    for m in index
                ):
                    return
                time.sleep(0.1)
        except (InferenceServerException, OSError, HTTPException) as exc:  # a dead or hung server
            log.info("drain skipped: %s", exc)
        finally:
            client.close()

    def stop(self, timeout_s: float = 30.0, drain: bool = True) -> int | None:
        """Drain (see `drain`), SIGTERM, then wait; SIGKILL after `timeout_s`."""
        if self.process is None:
            return None
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=timeout_s)
            self._supervisor = None
        if self.process.poll() is None:
            if drain:
                self.drain(timeout_s)
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # stub processes left behind by a server that was killed (they share its group)
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp.name, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
