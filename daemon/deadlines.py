"""Deadlines of model calls (request_timeout_s), all on one timer of the event loop.

Why: a timer per call costs uvloop a libuv timer handle made, started, stopped and closed:
1.6 us measured here, about 4% of a whole proxied call. Calls on one endpoint share one
timeout, so each new deadline falls after those already set: the one timer, set for the
earliest, stays as it is. A call that ends leaves the timer set; when it fires it ends the
calls that are due and is set again for the earliest left (or not at all).
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

# The least a timer is set ahead: uvloop's timers count whole milliseconds, so one set for a
# time less than a millisecond away fires before it and would be set again at once (a spin).
RESOLUTION_S = 0.001


class Due(Protocol):
    """A call's deadline as Deadlines keeps it: when (on the loop's clock), and what ends it."""

    at: float

    def expire(self) -> None: ...


class Deadlines:
    """The deadlines of calls in flight, on one timer: `add` when a call's deadline starts,
    `discard` when the call ends; a deadline that passes first is `expire`d, at its time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: dict[Due, None] = {}  # (an ordered set)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, deadline: Due) -> None:
        self._pending[deadline] = None
        if deadline.at < self._timer_at:  # (rare: a shorter timeout than those in flight)
            self._arm(deadline.at)

    def discard(self, deadline: Due) -> None:
        self._pending.pop(deadline, None)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self.loop.call_at(at, self._fire), at

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = self.loop.time()
        for deadline in [d for d in self._pending if d.at <= now]:
            del self._pending[deadline]
            deadline.expire()
        if self._pending:
            self._arm(max(min(d.at for d in self._pending), now + RESOLUTION_S))


class CallDeadline:
    """`asyncio.timeout` for one call, on `Deadlines`: its task is cancelled at the deadline
    and TimeoutError raised from the block. A plain context manager: entering and leaving
    need no await (and asyncio.timeout asks for the running loop twice, on Python 3.11 a
    getpid() system call each)."""

    __slots__ = ("_cancelling", "_deadlines", "_task", "at", "expired")

    def __init__(self, deadlines: Deadlines, seconds: float) -> None:
        task = asyncio.current_task(deadlines.loop)
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._deadlines = deadlines
        self.at = deadlines.loop.time() + seconds
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def __enter__(self) -> CallDeadline:
        self._deadlines.add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        self._deadlines.discard(self)
        if self.expired and exc_type is asyncio.CancelledError and \
                self._task.uncancel() <= self._cancelling:
            raise TimeoutError("call deadline passed") from exc
