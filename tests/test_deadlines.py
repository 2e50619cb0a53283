"""Call deadlines on one shared timer (daemon/deadlines.py), on a real event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from berth.daemon.deadlines import CallDeadline, Deadlines


async def _call(deadlines: Deadlines, timeout: float, work: float) -> float:
    """Work for `work` seconds under a deadline of `timeout`: when it ended (loop time)."""
    with CallDeadline(deadlines, timeout):
        await asyncio.sleep(work)
    return deadlines.loop.time()


async def test_each_call_ends_at_its_own_deadline_and_the_rest_run_on() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    start = loop.time()
    # a longer timeout first: the shorter one set after it must still fire first, on time
    slow = loop.create_task(_call(deadlines, 0.4, 5))
    quick = loop.create_task(_call(deadlines, 0.1, 5))
    done = loop.create_task(_call(deadlines, 0.3, 0.05))
    with pytest.raises(TimeoutError):
        await quick
    assert 0.1 <= loop.time() - start < 0.3
    assert not slow.done()
    assert await done - start < 0.3
    with pytest.raises(TimeoutError):
        await slow
    assert loop.time() - start >= 0.4
    assert len(deadlines) == 0


async def test_later_deadlines_share_the_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    call_at = loop.call_at

    def counting(when: float, callback: Callable[..., Any], *args: Any,
                 **kwargs: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__self__", None) is deadlines:  # (sleep's own timers too)
            armed.append(when)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting)
    deadlines = Deadlines(loop)
    calls = [loop.create_task(_call(deadlines, 0.2, 0.01)) for _ in range(50)]
    await asyncio.gather(*calls)
    assert len(armed) == 1  # the first call's; the 49 after it fell later
    assert len(deadlines) == 0
    await asyncio.sleep(0.25)  # the timer fires, finds nothing due, and is not set again
    assert len(armed) == 1


def test_the_timer_does_not_spin_while_a_deadline_is_under_a_millisecond_away() -> None:
    # uvloop (berthd's loop) rounds timers to whole milliseconds: set for 0.4 ms ahead, the
    # timer fired early, found nothing due and was set again at once, dozens of times per
    # deadline (found by a review). asyncio's own loop does not show it: uvloop runs this.
    fired = 0

    async def scenario() -> None:
        nonlocal fired
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        fire = deadlines._fire

        def counting() -> None:
            nonlocal fired
            fired += 1
            fire()

        deadlines._fire = counting  # type: ignore[method-assign]
        calls = [loop.create_task(_call(deadlines, 0.0104 + i * 0.0003, 5)) for i in range(5)]
        for call in calls:
            with pytest.raises(TimeoutError):
                await call

    uvloop.run(scenario())
    assert fired <= 10  # at most two a deadline


async def test_a_call_cancelled_from_elsewhere_is_not_a_timeout() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    call = loop.create_task(_call(deadlines, 0.05, 5))
    await asyncio.sleep(0.01)
    call.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await call
    assert len(deadlines) == 0
    await asyncio.sleep(0.08)  # its deadline passes: nothing to expire, nothing raised
