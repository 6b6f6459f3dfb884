"""A request's deadline, checked between the steps of the two loops (token decoding, denoising).

A client that stops waiting leaves its request running to the end unless the server knows when to
stop. Triton's `request.is_cancelled()` only sees a hang-up that reaches the model before the loop
starts (docs/RELIABILITY.md, "Cancellation"), so the request carries its own budget, `timeout_ms`,
counted from its arrival; the loops compare the clock with it before every step and stop with
`DeadlineExceeded`, which the served models answer as UNAVAILABLE (HTTP 503: retry later or
elsewhere, with a larger budget).

The clock is the wall clock (`time.time()`): the served request's arrival is stamped by `preprocess`
and read by `personalize` and `denoise`, which run in other processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_TIMEOUT_MS = 3_600_000  # an hour: a longer budget is a mistake in the request


class DeadlineExceeded(RuntimeError):
    """The request's time budget ran out (or its client hung up) between two steps of a loop."""


@dataclass(frozen=True)
class Deadline:
    at: float | None  # wall-clock seconds; None: no deadline
    timeout_ms: int = 0  # the budget, for the message
    cancelled: Callable[[], bool] | None = None  # the server's own hang-up signal, where it has one

    @classmethod
    def after(
        cls,
        timeout_ms: int,
        received_s: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Deadline:
        """`timeout_ms` after `received_s` (default: now); 0 = no deadline."""
        start = time.time() if received_s is None else received_s
        at = start + timeout_ms / 1000 if timeout_ms > 0 else None
        return cls(at, timeout_ms, cancelled)

    def check(self, done: int, total: int, what: str) -> None:
        """Raise `DeadlineExceeded` if the budget has passed or the client hung up; `done` of
        `total` `what` (e.g. "denoising steps") name where the work stopped."""
        if self.at is not None and time.time() > self.at:
            raise DeadlineExceeded(
                f"timeout_ms={self.timeout_ms} passed after {done} of {total} {what}; "
                "the request was stopped"
            )
        if self.cancelled is not None and self.cancelled():
            raise DeadlineExceeded(
                f"the client cancelled the request after {done} of {total} {what}"
            )


NO_DEADLINE = Deadline(None)
