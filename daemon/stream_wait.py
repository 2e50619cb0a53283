"""Keep-alive for streamed OpenAI calls that wait for a slot (a cold start takes minutes on
real models; idle proxies and clients cut a silent connection long before).

When such a call has waited `every` seconds without a slot, berth commits `200
text/event-stream` and writes an SSE comment (`: berth: starting llm, 12 s`) every `every`
seconds until the call gets its slot; the replica's events then follow in the same stream.
If the wait ends in an error instead, the stream ends with one `data:` chunk carrying the
OpenAI error object and `data: [DONE]`. A call that gets its slot in time is answered exactly
as without keep-alive; non-streaming calls never come here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from berth.daemon.errors import ApiError, as_api_error
from berth.daemon.http_types import Answer
from berth.daemon.models_api import error_object
from berth.daemon.proxy import Call, end_stream, serve_call
from berth.scheduler.errors import SchedulerError
from berth.scheduler.replica import ReplicaState
from berth.scheduler.router import Router


class KeepAlive:
    """The comment writer of one waiting call. `stop` ends it after any write under way (so
    no comment is ever cut in half); `response` is the committed stream, if it came to that."""

    def __init__(self, call: Call, every: float) -> None:
        self.call, self.every = call, every
        self.response: Answer | None = None
        self._stopping = asyncio.Event()
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        # A timer, not a task, until the first comment is due: most calls get a slot at once
        # and should pay next to nothing for keep-alive.
        self._timer = asyncio.get_running_loop().call_later(every, self._begin)

    def _begin(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping.is_set():
            if self.response is None:
                self.response = await self._commit()
            await self.response.write(self._comment())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.every)

    async def _commit(self) -> Answer:
        headers = [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"no-cache"),
                   (b"X-Request-Id", self.call.request_id.encode("utf-8", "surrogateescape"))]
        response = await self.call.reply.start(200, "OK", headers, None)
        self.call.committed = response
        return response

    def _comment(self) -> bytes:
        pool = self.call.pool
        doing = "waiting for a slot on" if pool.count(ReplicaState.READY) else "starting"
        waited = time.monotonic() - self._started
        return f": berth: {doing} {pool.name}, {waited:.0f} s\n\n".encode()

    async def stop(self) -> None:
        self._timer.cancel()
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self._task  # a client gone mid-comment: the call's own write says so

    def abort(self) -> None:
        self._timer.cancel()
        if self._task is None:
            return
        self._task.cancel()
        if self._task.done() and not self._task.cancelled():
            self._task.exception()  # seen here: a client that left mid-comment


async def serve_streaming(router: Router, call: Call, every: float) -> Answer:
    """serve_call with keep-alive comments while the call waits for its slot."""
    waiting = KeepAlive(call, every)
    call.on_lease = waiting.stop
    try:
        return await serve_call(router, call, None)
    except (ApiError, SchedulerError) as exc:
        await waiting.stop()
        if waiting.response is None:
            raise
        error = as_api_error(exc)
        call.failed_status = error.status
        await end_stream(waiting.response, error_object(error.status, error.code,
                                                        error.message))
        return waiting.response
    finally:
        waiting.abort()  # a no-op once stopped; a client that left cancels the writer here
        call.on_lease = None  # the call and its keep-alive refer to each other: freed at once
