"""berth's client to its replicas: plain HTTP/1.1 on asyncio protocols, parsed by llhttp.

Every data-plane call pays for this client, so it does little per call: a kept-alive connection
per call in flight (LIFO per replica address, so the warmest is reused), the request head written
as one buffer, the answer parsed by llhttp (httptools, the parser uvicorn uses) straight into a
queue of body chunks. No cookie jar, redirects, decompression or tracing: berth relays bytes.

A connection goes back to the pool only after an answer that ended cleanly, with keep-alive,
after the whole request was written, and with nothing after the answer's end: garbage, bytes past
Content-Length or a second answer nobody asked for close it instead.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import httptools

from berth.daemon.chunks import chunks_of
from berth.daemon.flow import FlowControl
from berth.daemon.http_types import media_type

# A relay's consumer: takes one body chunk; returns a future while it can take no more
Sink = Callable[[bytes], "asyncio.Future[None] | None"]
HIGH_WATER = 256 * 1024  # answer bytes queued before the replica's socket stops being read
LOW_WATER = 64 * 1024
IDLE_S = 55.0  # an idle connection older than this is closed, not reused (under nginx's 60 s)
NO_BODY = frozenset({204, 304})
MAX_HEAD = 64 * 1024  # an answer's head (status line and headers), as the front's
MAX_HEADERS = 128
MAX_FIELD = 8190


class UpstreamError(Exception):
    """The replica's answer could not be had, or not read to its end."""


class UpstreamRefused(UpstreamError):
    """No connection to the replica: no byte of the call was sent, so it may go elsewhere."""


class UpstreamUnanswered(UpstreamError):
    """The replica closed the connection before any byte of an answer (e.g. it stopped
    listening with the connection still in its backlog): a safe call may go elsewhere."""


class UpstreamResponse:
    """One answer from a replica: status and headers at once, the body as it arrives.

    The body is read with `read()` (whole), `chunks()` (as it comes) or `relay(sink)` (each
    chunk handed on from the connection's callback, without a task switch); each ends with an
    UpstreamError when the replica broke off."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_error", "_sink", "_sink_full", "_waiter",
                 "chunked", "complete", "content_length", "content_type", "fields",
                 "head_only", "reason", "status")

    def __init__(self, conn: UpstreamConnection, status: int, reason: str,
                 fields: list[tuple[bytes, bytes]]) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.fields = fields  # the header lines as the replica sent them (bytes), in order
        self.content_length: int | None = None
        self.content_type = ""
        self.chunked = False
        for name, value in fields:
            lower = name.lower()
            if lower == b"content-length":  # llhttp checked it: digits, maybe padded
                self.content_length = int(value)
            elif lower == b"content-type":
                self.content_type = media_type(value)
            elif lower == b"transfer-encoding":
                self.chunked = b"chunked" in value.lower()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._sink: Sink | None = None
        self._sink_full = False  # the sink's consumer is full: the replica is not read
        self.complete = False
        self.head_only = False  # the answer to HEAD: Content-Length says what GET would send

    def feed(self, chunk: bytes) -> None:
        if self._sink is not None:
            self._hand_on(chunk)
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER:
            self._conn.pause_reading()
        if self._waiter is not None:  # (mostly none: the body came with its head)
            self._wake()

    def finish(self) -> None:
        self.complete = True
        if self._waiter is not None:
            self._wake()

    def fail(self, error: UpstreamError) -> None:
        if not self.complete and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_chunk(self) -> bytes:
        """The body bytes queued so far (at least one), or b"" at the end."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self._conn.loop.create_future()
            await self._waiter
        chunk = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._conn.resume_reading()
        return chunk

    async def relay(self, sink: Sink) -> None:
        """Hand the body to `sink` chunk by chunk as it arrives, from the connection's own
        callback: a streamed answer costs no task switch per chunk (measured: 500 concurrent
        streams, bench/RESULTS.md). While the future `sink` returns is pending, the replica
        is not read. Returns at the body's end; raises the replica's UpstreamError or what
        `sink` raised (the client left), after which nothing more reaches `sink`."""
        queued, self._chunks = self._chunks, deque()
        self._buffered = 0
        self._sink = sink
        try:
            for chunk in queued:  # what came before the relay began, first
                if self._sink is None:
                    break  # the sink failed: nothing more for it
                self._hand_on(chunk)
            if not self._sink_full and self._sink is not None:
                self._conn.resume_reading()
            while not self.complete and self._error is None:
                self._waiter = self._conn.loop.create_future()
                await self._waiter
            if self._error is not None:  # (also: the sink failed on the last chunk)
                # handed over, not kept: its traceback holds this frame, which holds self
                error, self._error = self._error, None
                raise error
        finally:
            self._sink = None

    def _hand_on(self, chunk: bytes) -> None:
        assert self._sink is not None
        try:
            full = self._sink(chunk)
        except Exception as exc:  # the client left, mostly: nothing more goes to the sink
            self._sink, self._error = None, exc
            self._conn.pause_reading()
            self._wake()
            return
        if full is not None and not self._sink_full:
            self._sink_full = True
            self._conn.pause_reading()
            full.add_done_callback(self._sink_ready)

    def _sink_ready(self, _: asyncio.Future[None]) -> None:
        self._sink_full = False
        if self._sink is not None:
            self._conn.resume_reading()

    def chunks(self) -> AsyncIterator[bytes]:
        return chunks_of(self.next_chunk)

    async def read(self) -> bytes:
        if self.complete:  # the common small answer: no await
            return self.body()
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def body(self) -> bytes:
        """The body, once `complete`: all of it, taken."""
        assert self.complete
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return body

    @property
    def failed(self) -> bool:
        """The replica broke off before the body's end."""
        return self._error is not None


class UpstreamConnection(FlowControl, asyncio.Protocol):
    """One keep-alive connection to a replica, carrying one call at a time."""

    def __init__(self, address: str, loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self.loop = loop
        self.idle_since = 0.0
        self._transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._fields: list[tuple[bytes, bytes]] = []
        # Bytes read while the answer's head is incomplete, then (the trailer's guard) since
        # a read last carried body bytes: llhttp holds a header or trailer line until its end
        self._head_bytes = 0
        self._reason = b""
        self._head_only = False
        self._keep_alive = False
        self._clean = True  # nothing seen that makes the connection unfit for another call
        self._written = True  # the whole request went out
        self._expecting = False  # a request is out and its answer not yet whole
        self._fresh_parser = True  # after an answer to HEAD llhttp may still wait for a body
        self._lost = False
        # Told after each read and at the connection's end, once the parser is done with
        # what came (the fast path's call: daemon/fast_call.py); None for calls in a task.
        self.listener: Callable[[], None] | None = None

    # --- the call ------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self._lost and self._transport is not None and \
            not self._transport.is_closing()

    def send(self, head: bytes, body: bytes | AsyncIterator[bytes] | None, *,
             chunked: bool = False, head_only: bool = False) -> Awaitable[UpstreamResponse]:
        """Write one request; await the result for its answer's head. `body` bytes go in the
        same write as the head; an iterator is written as it yields (chunk-framed when
        `chunked`), while the answer may already come."""
        assert self._transport is not None and self._head is None
        if self._fresh_parser:
            self._parser = httptools.HttpResponseParser(self)
        self._fresh_parser = head_only
        self._expecting = True
        head_future: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self._head = head_future
        self._response, self._head_only, self._keep_alive = None, head_only, False
        if body is None or isinstance(body, bytes):
            self._transport.write(head + body if body else head)
            return head_future  # (the future itself: no coroutine around it)
        self._written = False
        self._transport.write(head)
        return self._answered_while_sending(head_future, body, chunked)

    async def _answered_while_sending(self, head_future: asyncio.Future[UpstreamResponse],
                                      body: AsyncIterator[bytes],
                                      chunked: bool) -> UpstreamResponse:
        writer = self.loop.create_task(self._write_body(body, chunked))
        writer.add_done_callback(_read_out)
        try:
            answer = await head_future
        except BaseException as exc:
            # Raised by name, not from a `finally`: compiled by mypyc (daemon/native.py), an
            # exception pending in a `finally` that awaits is lost (mypyc issue 1114), and the
            # call came back None (a 500 where a deadline must answer 504).
            await _stopped(writer)
            raise exc
        await _stopped(writer)  # answered early: the rest of the body is not wanted
        return answer

    async def _write_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        assert self._transport is not None
        try:
            async for chunk in body:
                if chunk:
                    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
                    self._transport.write(frame)
                    if self._drain is not None:
                        await self._drain
            if chunked:
                self._transport.write(b"0\r\n\r\n")
            self._written = True
        except BaseException as exc:
            self.close()  # a request cut short leaves the connection in an unknown state
            self._broke(UpstreamError(f"request body not sent whole: {exc!r}"))
            raise

    @property
    def keepable(self) -> bool:
        """Fit to carry another call (one test of all, as every call asks): the last call
        ended cleanly, with keep-alive, its request written whole; and its answer
        - was no event stream: measured with 500 concurrent streamed chats, streams on
          connections kept from earlier streams had a per-event p99 of 70-100 ms against
          11-23 ms on fresh ones (bench/RESULTS.md), and a stream dwarfs a connect;
        - was not left unread (it ended while the client's buffer was full): bytes the
          replica sent past it could be read as the next call's answer."""
        response = self._response
        return self.usable and self._clean and self._written and self._keep_alive and \
            response is not None and response.complete and \
            response.content_type != "text/event-stream" and not self._reading_paused

    def reset(self) -> None:
        """Ready for the next call; until then any byte from the replica closes it."""
        self._head = self._response = self.listener = None
        self._expecting = False

    def close(self) -> None:
        self._clean = False
        if self._transport is not None:
            self._transport.close()

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or not self._expecting or not self._clean:
            self.close()  # bytes nobody asked for: the stream can no longer be trusted
            return
        self._head_bytes += len(data)  # (body bytes set it back to 0: on_body)
        try:
            parser.feed_data(data)
            if self._head_bytes > MAX_HEAD:
                raise ValueError(f"an answer head or trailer over {MAX_HEAD} bytes")
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, ValueError) as exc:
            self.close()
            self._broke(UpstreamError(f"the replica answered something that is not HTTP: "
                                      f"{exc!r}"))
        if self.listener is not None:
            self.listener()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("replica connection closed"))
        response = self._response
        if response is not None and not response.complete and self._eof_ends_body(response):
            response.finish()  # a body without length or chunks ends where the connection does
        elif self._head is not None and self._head.done():
            self._broke(UpstreamError("the replica closed the connection mid-answer"))
        else:
            self._broke(UpstreamUnanswered("the replica closed the connection before "
                                           "answering"))
        listener, self.listener = self.listener, None
        if listener is not None:
            listener()
        # The parser and the answer refer back to this connection: let refcounting free
        # them all now rather than the cycle collector later (a pause under load; front.py)
        self._parser = self._head = self._response = None

    # --- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._fields, self._reason, self._head_bytes = [], b"", 0
        if self._response is not None:  # a second answer to one request
            self._clean = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is not None:
            return  # a trailer after a chunked body: not passed on (nor kept for the next)
        if len(self._fields) >= MAX_HEADERS or len(value) > MAX_FIELD:
            raise ValueError(f"more than {MAX_HEADERS} header fields or one over {MAX_FIELD} "
                             "bytes")
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        fields, reason = self._fields, self._reason
        self._fields, self._reason = [], b""
        if status < 200 or self._response is not None:
            return  # 100 Continue and friends: the real answer follows
        response = self._response = UpstreamResponse(self, status, reason.decode("latin-1"),
                                                      fields)
        if self._head is not None and not self._head.done():
            self._head.set_result(response)
        response.head_only = self._head_only
        if self._head_only or status in NO_BODY:
            self._keep_alive = self._parser.should_keep_alive()
            response.finish()

    def on_body(self, chunk: bytes) -> None:
        response = self._response
        if response is None or response.complete:
            self._clean = False  # a body where none may be (HEAD, 204): not to be trusted
        else:
            self._head_bytes = 0
            response.feed(chunk)

    def on_message_complete(self) -> None:
        response, parser = self._response, self._parser
        if response is None or parser is None or response.complete:
            return
        self._keep_alive = parser.should_keep_alive()
        response.finish()

    # --- helpers -------------------------------------------------------------------------

    def _eof_ends_body(self, response: UpstreamResponse) -> bool:
        return response.content_length is None and not response.chunked

    def _broke(self, error: UpstreamError) -> None:
        self._clean = False
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)
        elif self._response is not None:
            self._response.fail(error)


async def _stopped(writer: asyncio.Task[None]) -> None:
    """A request body's writer cancelled, if it still writes. Waited for, not awaited: this
    call's own cancel (its deadline, its client gone) arriving meanwhile must propagate, not be
    taken for the writer's."""
    if not writer.done():
        writer.cancel()
        await asyncio.wait((writer,))


def _read_out(writer: asyncio.Task[None]) -> None:
    """A body writer's end, read: its error was told to the call already (_broke)."""
    if not writer.cancelled():
        writer.exception()


class UpstreamPool:
    """Kept-alive connections to replicas, by address. `connect` gives a connection for one
    call; `keep_or_close` takes it back when the call is over, closing it unless it is keepable."""

    def __init__(self, connect_timeout_s: float = 5.0, idle_s: float = IDLE_S) -> None:
        # Made in the running loop, and kept: on Python 3.11 each asyncio.get_running_loop()
        # is a getpid() system call, and calls would pay several.
        self.loop = asyncio.get_running_loop()
        self.connect_timeout_s = connect_timeout_s
        self.idle_s = idle_s
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self._closed = False

    def idle(self, address: str) -> UpstreamConnection | None:
        """A kept-alive connection to `address`, if one is idle (no await: most calls)."""
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if conn.usable and self.loop.time() - conn.idle_since < self.idle_s:
                return conn
            conn.close()  # closed by the replica meanwhile, or idle too long
        return None

    async def connect(self, address: str) -> UpstreamConnection:
        """A kept-alive connection to `address`, or a new one (UpstreamRefused if none)."""
        loop = self.loop
        conn = self.idle(address)
        if conn is not None:
            return conn
        host, _, port = address.rpartition(":")
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(address, loop), host, int(port))
        except TimeoutError as exc:
            raise UpstreamRefused(f"connecting to {address} timed out after "
                                  f"{self.connect_timeout_s:g} s") from exc
        except OSError as exc:
            raise UpstreamRefused(f"cannot connect to {address}: {exc}") from exc
        return conn

    def keep_or_close(self, conn: UpstreamConnection) -> None:
        if self._closed or not conn.keepable:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        conn.reset()
        self._idle.setdefault(conn.address, []).append(conn)

    def forget(self, address: str) -> None:
        """Close the idle connections to a replica that went away."""
        for conn in self._idle.pop(address, []):
            conn.close()

    def close(self) -> None:
        self._closed = True
        for address in list(self._idle):
            self.forget(address)
