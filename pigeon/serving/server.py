"""Start the real `tritonserver` (from the `nvidia-pytriton` wheel) on a model repository.

What the binary needs on a CPU machine (../shared/design/runtime-facts.md): a backend directory whose
`python/` folder holds the Python backend library, its utils module and the stub for this Python
version; this virtual environment's `bin` first on PATH (the stub finds its interpreter there, and its
numpy must be < 2); the wheel's libraries and this interpreter's LIBDIR on LD_LIBRARY_PATH; the cache
directory for the response cache. It binds 127.0.0.1 unless told otherwise, and loads models
explicitly, so versions switch through the model-control API without a restart.

    with TritonServer("triton_models", models=["pigeon"]) as server:
        print(server.http_url)
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """tritonserver could not be found, started or reached; the message says which and why."""


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

    def __post_init__(self) -> None:
        self.repository = Path(self.repository).resolve()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

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
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerError(
            f"tritonserver not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then wait (Triton drains in-flight requests); SIGKILL after `timeout_s`."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp.name, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
