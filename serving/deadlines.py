"""Per-request deadlines without a timer per request.

`asyncio.timeout` costs ~4.5 µs a request (a Timeout object, a timer handle scheduled and cancelled, the task's
cancel bookkeeping) and the service had two per request: the 504 deadline and the body deadline. That was 2% of
a LeNet-5 request's server CPU (#10). Every deadline of one kind has the same length, so deadlines started in time
order also end in that order: a dict (which keeps insertion order) is already sorted, and one timer per event loop,
armed while any deadline is pending, ends the due ones from the front. A deadline ends up to `TICK_S` late; the
timeouts it serves are seconds long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

TICK_S = 0.1  # how often the pending deadlines are checked, while there are any


class Deadline:
    """One request's deadline. `expired` once it has passed; then `on_expiry` ran if `armed` was set at that moment
    (the body deadline arms itself only while the request waits for its body)."""

    __slots__ = ("when", "armed", "expired", "on_expiry")

    def __init__(self, when: float, on_expiry: Callable[[], object], armed: bool) -> None:
        self.when, self.on_expiry, self.armed, self.expired = when, on_expiry, armed, False


class Deadlines:
    """Deadlines `timeout_s` from their start, for the tasks of one event loop at a time (one serving worker)."""

    def __init__(self, timeout_s: float, tick_s: float = TICK_S) -> None:
        self.timeout_s, self.tick_s = timeout_s, tick_s
        self._pending: dict[Deadline, None] = {}  # in start order, which is deadline order
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, on_expiry: Callable[[], object], armed: bool = True) -> Deadline:
        """A deadline `timeout_s` from now, calling `on_expiry()` when it passes (if armed then), unless stopped."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests run one per test): the old one's deadlines are moot
            self._loop, self._timer, self._pending = loop, None, {}
        deadline = Deadline(loop.time() + self.timeout_s, on_expiry, armed)
        self._pending[deadline] = None
        if self._timer is None:
            self._timer = loop.call_later(self.tick_s, self._end_due)
        return deadline

    def stop(self, deadline: Deadline) -> None:
        self._pending.pop(deadline, None)

    def _end_due(self) -> None:
        loop = self._loop
        now = loop.time()
        while self._pending:
            deadline = next(iter(self._pending))  # the earliest
            if deadline.when > now:
                break
            del self._pending[deadline]
            deadline.expired = True
            if deadline.armed:
                deadline.on_expiry()
        self._timer = loop.call_later(self.tick_s, self._end_due) if self._pending else None


def cancelled_by(deadline: Deadline, task: asyncio.Task) -> bool:
    """In an `except CancelledError` around what `deadline` (started with `task.cancel`) guards: whether the
    cancellation was the deadline's alone. If so it is taken back (`uncancel`), as `asyncio.timeout` does before
    raising TimeoutError; a cancellation from elsewhere as well (shutdown) must propagate."""
    return deadline.expired and deadline.armed and task.uncancel() == 0
