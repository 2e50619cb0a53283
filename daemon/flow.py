"""Flow control of one connection, for berth's own protocols (daemon/front.py and
daemon/upstream.py): writers wait while the transport's buffer is full, and reading stops
while what was read waits for a slow consumer."""

from __future__ import annotations

import asyncio


class FlowControl:
    """asyncio.Protocol's write flow control callbacks, and pause/resume of reading.
    Subclasses set `loop` and `_transport`, and await `_drain` (when set) before writing on."""

    loop: asyncio.AbstractEventLoop
    _transport: asyncio.Transport | None
    _drain: asyncio.Future[None] | None = None
    _reading_paused = False

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    def pause_reading(self) -> None:
        transport = self._transport
        if not self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = True
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self._transport
        if self._reading_paused and transport is not None and not transport.is_closing():
            self._reading_paused = False
            transport.resume_reading()
