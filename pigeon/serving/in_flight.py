"""A server-wide bound on the requests inside the two generation loops (KServe's containerConcurrency).

Triton queues each loop model's requests on their own, so under overload a request it accepts waits
behind one request at `personalize` and another at `denoise`, while both loops share the cores: its
latency grows to several times the unloaded one however short the queues (docs/RELIABILITY.md,
"Backpressure"). With `ServingConfig.max_in_flight` N, `preprocess` admits a request only while
fewer than N are between it and the end of `denoise`, and refuses the rest at once with
`ServerBusy` (UNAVAILABLE / 503). Admitted requests then run as they would unloaded.

The models run in separate processes, so the count lives in a small file of slots, read and written
under an exclusive `fcntl.flock`: `preprocess` takes a slot and passes its token down the ensemble,
`denoise` gives it back when its loop ends (or `personalize`, if the request fails there). A slot
whose request vanished without giving it back (its process was killed, or Triton refused it at a
queue) frees itself when its lease ends: the request's own `timeout_ms`, else
`ServingConfig.in_flight_lease_ms`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import struct
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from pigeon.config import MAX_IN_FLIGHT  # the file's slots, whatever the configured limit

SLOT = struct.Struct("<qd")  # (token, lease end as wall-clock seconds); token 0: free


class ServerBusy(RuntimeError):
    """The server already holds its `max_in_flight` requests; the request was not started."""


def slots_path(repository: Path) -> Path:
    """The slot file shared by every model of one model repository: servers of different
    repositories on one machine do not count each other's requests, two servers of the same
    repository share one limit."""
    key = hashlib.sha256(str(Path(repository).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"pigeon-in-flight-{key}"


class InFlightSlots:
    """`acquire` a slot (or `ServerBusy`), `release` it by its token; any process, one file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _locked(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = MAX_IN_FLIGHT * SLOT.size
            if os.fstat(fd).st_size < size:  # new file: every slot free (zeros)
                os.ftruncate(fd, size)
            yield fd
        finally:
            os.close(fd)  # closing drops the lock

    @staticmethod
    def _slots(fd: int, limit: int) -> list[tuple[int, float]]:
        data = os.pread(fd, limit * SLOT.size, 0)
        return [SLOT.unpack_from(data, i * SLOT.size) for i in range(limit)]

    def acquire(self, limit: int, lease_s: float, now: float | None = None) -> int:
        """A token for one of the first `limit` slots that is free or past its lease; `ServerBusy`
        when all `limit` are held."""
        if not 1 <= limit <= MAX_IN_FLIGHT:
            raise ValueError(f"limit={limit} must be in [1, {MAX_IN_FLIGHT}]")
        now = time.time() if now is None else now
        with self._locked() as fd:
            for i, (token, lease_end) in enumerate(self._slots(fd, limit)):
                if token == 0 or lease_end < now:
                    mine = secrets.randbits(63) or 1
                    os.pwrite(fd, SLOT.pack(mine, now + lease_s), i * SLOT.size)
                    return mine
        raise ServerBusy(
            f"the server is at its limit of {limit} requests in flight (max_in_flight); "
            "the request was not started, retry later or elsewhere"
        )

    def release(self, token: int) -> None:
        """Free the slot holding `token`; nothing if it has none (0) or its lease was taken over."""
        if token == 0:
            return
        with self._locked() as fd:
            for i, (held, _) in enumerate(self._slots(fd, MAX_IN_FLIGHT)):
                if held == token:
                    os.pwrite(fd, SLOT.pack(0, 0.0), i * SLOT.size)
                    return

    def held(self, now: float | None = None) -> int:
        """How many slots hold a request whose lease has not ended."""
        now = time.time() if now is None else now
        with self._locked() as fd:
            return sum(1 for t, end in self._slots(fd, MAX_IN_FLIGHT) if t != 0 and end >= now)
