"""New calls begin a few per pass of the event loop (daemon/pacing.py), on real loops: what
a socket brought in meanwhile is read before the calls that had to wait."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from berth.daemon.pacing import CallPacer

LOOPS: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop,
                                                         uvloop.new_event_loop]


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop],
        scenario: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario)


class Reader(asyncio.Protocol):
    """Logs each read, as a relay of a running stream would forward it."""

    def __init__(self, log: list[object]) -> None:
        self.log = log

    def data_received(self, data: bytes) -> None:
        self.log.append("read")


async def _call(pacer: CallPacer, name: int, log: list[object],
                begun: Callable[[], object] = lambda: None) -> None:
    turn = pacer.turn()
    if turn is not None:
        await turn
    log.append(name)
    begun()


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_burst_begins_per_pass_in_order_and_a_read_comes_before_the_waiting(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        log: list[object] = []
        ours, theirs = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(lambda: Reader(log), ours)
        pacer = CallPacer(loop, per_pass=2)
        # The first call's replica answers at once: a chunk to relay while the burst begins
        calls = [loop.create_task(_call(pacer, i, log, lambda: theirs.send(b"chunk") if not
                                        log[1:] else None)) for i in range(6)]
        await asyncio.gather(*calls)
        # Without pacing all six would begin in one pass, before the loop polls its sockets.
        assert log == [0, 1, "read", 2, 3, 4, 5]
        assert pacer.turn() is None  # all waiters served: a new call begins at once
        transport.close()
        theirs.close()

    run(loop_factory, scenario())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_each_pass_gives_at_most_per_pass_turns(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pacer = CallPacer(loop, per_pass=3)
        turns = [pacer.turn() for _ in range(10)]
        assert turns[:3] == [None, None, None]
        waiters = [t for t in turns[3:] if t is not None]
        assert len(waiters) == 7
        done_per_pass = []
        while not all(w.done() for w in waiters):
            await asyncio.sleep(0)  # one pass of the loop
            done_per_pass.append(sum(w.done() for w in waiters))
        steps = [b - a for a, b in zip([0, *done_per_pass], done_per_pass, strict=False)]
        assert max(steps) <= 3
        assert [w.done() for w in waiters] == [True] * 7

    run(loop_factory, scenario())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_waiter_cancelled_gives_its_turn_to_the_next(
        loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        log: list[object] = []
        pacer = CallPacer(loop, per_pass=1)
        calls = [loop.create_task(_call(pacer, i, log)) for i in range(4)]
        await asyncio.sleep(0)  # all have asked: 0 began, 1-3 wait
        calls[1].cancel()  # its client left while it waited
        await asyncio.gather(calls[0], calls[2], calls[3])
        assert log == [0, 2, 3]
        assert calls[1].cancelled()
        assert pacer.turn() is None

    run(loop_factory, scenario())
