"""New calls begin a few at a time per pass of the event loop, so that a burst of them does
not hold back the streams already running.

Why: a streamed call's chunks are relayed from the replica connection's read callback, which
runs when the loop polls its sockets; a new call's first step (routing, checks, the replica
connection, its request) runs in the loop's ready queue, and the loop polls only once the
whole queue has run. 500 streamed chats arriving at once put hundreds of first steps of a few
hundred microseconds each in one queue, and every running stream waited tens of milliseconds
for its next chunk (bench/RESULTS.md: 500 streams, added per-chunk p99). Beginning at most
`per_pass` calls in a pass and the rest in the passes after (each after a poll) costs a
waiting call one pass of the loop.
"""

from __future__ import annotations

import asyncio
from collections import deque

STARTS_PER_PASS = 2  # (1, 2 and 4 measured alike on 500 streams; unpaced far worse)


class CallPacer:
    """Turns for new calls: `turn()` is None when the call may begin now, else a future done
    when its turn comes (in order of asking, at most `per_pass` a pass; a waiter cancelled
    meanwhile gives its turn to the next)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_pass: int = STARTS_PER_PASS) -> None:
        self.loop = loop
        self.per_pass = per_pass
        self._left = per_pass  # turns left in this pass
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._counting = False  # a pass's end is due (its callback is in the ready queue)

    def turn(self) -> asyncio.Future[None] | None:
        if self._left and not self._waiting:
            self._left -= 1
            self._count_pass()
            return None
        waiter = self.loop.create_future()
        self._waiting.append(waiter)
        self._count_pass()
        return waiter

    def _count_pass(self) -> None:
        if not self._counting:
            self._counting = True
            self.loop.call_soon(self._pass_ended)

    def _pass_ended(self) -> None:
        """The next pass begins: its turns go to those waiting first. Their calls begin in
        the pass after this one's (set_result schedules them), so after the loop polls."""
        self._counting = False
        self._left = self.per_pass
        waiting = self._waiting
        while waiting and self._left:
            waiter = waiting.popleft()
            if not waiter.done():  # (cancelled: its client left while it waited)
                waiter.set_result(None)
                self._left -= 1
        if waiting or self._left < self.per_pass:
            self._count_pass()
