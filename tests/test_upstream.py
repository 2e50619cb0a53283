"""berth's client to replicas (daemon/upstream.py) against scripted HTTP servers on loopback.

Each server answers from a script of raw bytes, so the tests can send what a misbehaving model
server sends: garbage, bytes past Content-Length, two answers to one request, a close between
calls. They check what the data plane relies on: the answer's bytes exactly, and that a
connection is reused only after a clean answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from berth.daemon.upstream import UpstreamError, UpstreamPool, UpstreamRefused

GET = b"GET /x HTTP/1.1\r\nHost: r\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

Answer = Callable[[bytes], bytes | None]  # request bytes -> answer (None: close)


class Scripted:
    """A loopback server answering each request with `answer(request head + body so far)`;
    it counts connections and keeps what each one received."""

    def __init__(self, answer: Answer, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        index = len(self.received)
        self.received.append(b"")
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.received[index] += head
                await self.read_body(head, reader, index)
                answer = self.answer(self.received[index])
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def read_body(self, head: bytes, reader: asyncio.StreamReader, index: int) -> None:
        lower = head.lower()
        if b"content-length:" in lower:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            self.received[index] += await reader.readexactly(length)
        elif b"transfer-encoding: chunked" in lower:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.strip(), 16)
                self.received[index] += size_line + await reader.readexactly(size + 2)
                if size == 0:
                    return

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def call(pool: UpstreamPool, address: str, head: bytes = GET,
               body: bytes | AsyncIterator[bytes] | None = None, **kw: bool) -> tuple[int, bytes]:
    conn = await pool.connect(address)
    try:
        response = await conn.send(head, body, **kw)
        return response.status, await response.read()
    finally:
        pool.keep_or_close(conn)


async def test_a_clean_answer_leaves_the_connection_for_the_next_call():
    async with Scripted(lambda _: OK) as server:
        pool = UpstreamPool()
        for _ in range(3):
            assert await call(pool, server.address) == (200, b"ok")
        assert server.connections == 1


async def test_garbage_is_an_error_and_the_connection_is_not_reused():
    answers = iter([b"SPDY/9 banana\r\n\r\n", OK])
    async with Scripted(lambda _: next(answers)) as server:
        pool = UpstreamPool()
        with pytest.raises(UpstreamError, match="not HTTP"):
            await call(pool, server.address)
        assert await call(pool, server.address) == (200, b"ok")
        assert server.connections == 2


async def test_bytes_past_content_length_are_dropped_with_the_connection():
    over = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA-BYTES"
    async with Scripted(lambda _: over) as server:
        pool = UpstreamPool()
        assert await call(pool, server.address) == (200, b"ok")  # exactly the declared body
        await asyncio.sleep(0.05)
        assert await call(pool, server.address) == (200, b"ok")
        assert server.connections == 2


async def test_a_second_answer_nobody_asked_for_closes_the_connection():
    async with Scripted(lambda _: OK + OK) as server:
        pool = UpstreamPool()
        assert await call(pool, server.address) == (200, b"ok")
        await asyncio.sleep(0.05)
        assert await call(pool, server.address) == (200, b"ok")
        assert server.connections == 2


async def test_a_connection_the_replica_closed_between_calls_is_not_used_again():
    async with Scripted(lambda _: OK, close_after=True) as server:
        pool = UpstreamPool()
        for _ in range(3):
            assert await call(pool, server.address) == (200, b"ok")
            await asyncio.sleep(0.05)  # the replica's close reaches berth before the next call
        assert server.connections == 3


async def test_answers_without_a_body_end_at_their_head():
    answers = {b"HEAD /x": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
               b"GET / H": b"HTTP/1.1 204 No Content\r\n\r\n",
               b"GET /n ": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"}

    def answer(received: bytes) -> bytes:
        request_line = received.split(b"\r\n\r\n")[-2].split(b"\r\n")[0]
        return answers[request_line[:7]]

    async with Scripted(answer) as server:
        pool = UpstreamPool()
        conn = await pool.connect(server.address)
        response = await conn.send(b"HEAD /x HTTP/1.1\r\nHost: r\r\n\r\n", None, head_only=True)
        assert (response.status, response.content_length, await response.read()) == \
            (200, 1000, b"")
        pool.keep_or_close(conn)
        assert await call(pool, server.address, b"GET / HTTP/1.1\r\nHost: r\r\n\r\n") == \
            (204, b"")
        assert await call(pool, server.address, b"GET /n HTTP/1.1\r\nHost: r\r\n\r\n") == \
            (304, b"")
        assert server.connections == 1  # all three ended cleanly at their head


async def test_chunked_both_ways_and_an_interim_100_continue():
    chunked = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
               b"\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")

    async def parts() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b""  # an empty read is not a last chunk
        yield b"world"

    async with Scripted(lambda _: chunked) as server:
        pool = UpstreamPool()
        head = b"POST /x HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert await call(pool, server.address, head, parts(), chunked=True) == (200, b"abcde")
        assert server.received[0].endswith(b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
        assert await call(pool, server.address, head, parts(), chunked=True) == (200, b"abcde")
        assert server.connections == 1


async def test_a_body_ended_by_close_is_read_whole_and_not_reused():
    async with Scripted(lambda _: b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close_after=True) \
            as server:
        pool = UpstreamPool()
        assert await call(pool, server.address) == (200, b"until the end")


async def test_a_replica_closing_mid_answer_is_an_error():
    async with Scripted(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nonly",
                        close_after=True) as server:
        pool = UpstreamPool()
        with pytest.raises(UpstreamError, match="mid-answer"):
            await call(pool, server.address)


async def test_no_listener_is_refused_before_any_byte_is_sent():
    async with Scripted(lambda _: OK) as server:
        address = server.address
    await asyncio.sleep(0.01)
    with pytest.raises(UpstreamRefused):
        await UpstreamPool().connect(address)


async def test_a_large_answer_is_read_with_bounded_buffering():
    size = 8 * 1024 ** 2
    async with Scripted(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
                        + b"x" * size) as server:
        pool = UpstreamPool()
        conn = await pool.connect(server.address)
        response = await conn.send(GET, None)
        await asyncio.sleep(0.2)  # nobody reads: the replica's socket stops being read
        assert response._buffered < 1024 ** 2
        total = 0
        async for chunk in response.chunks():
            total += len(chunk)
        assert total == size
        pool.keep_or_close(conn)
        assert await call(pool, server.address) is not None and server.connections == 1


async def test_a_connection_that_carried_an_event_stream_is_not_kept():
    stream = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 11\r\n"
              b"\r\ndata: x\r\n\r\n")
    answers = iter([stream, OK, OK])
    async with Scripted(lambda _: next(answers)) as server:
        pool = UpstreamPool()
        assert await call(pool, server.address) == (200, b"data: x\r\n\r\n")
        assert await call(pool, server.address) == (200, b"ok")
        assert await call(pool, server.address) == (200, b"ok")
        assert server.connections == 2  # a new one after the stream, then kept


async def test_trailers_are_not_passed_on_nor_kept_for_the_next_answer():
    # A replica's trailer once leaked into the next call's answer on the same connection.
    with_trailer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
                    b"X-Secret: for-client-a\r\n\r\n")
    answers = iter([with_trailer, OK])
    async with Scripted(lambda _: next(answers)) as server:
        pool = UpstreamPool()
        for _ in range(2):
            conn = await pool.connect(server.address)
            response = await conn.send(GET, None)
            assert await response.read() == b"ok"
            assert b"X-Secret" not in dict(response.fields)
            pool.keep_or_close(conn)
        assert server.connections == 1


async def test_a_cancel_while_the_body_writer_winds_down_is_not_swallowed():
    # A call's deadline (or its client leaving) cancels its task; arriving while the request
    # body's writer was being stopped, it was once taken for the writer's own and lost.
    async def answer_at_once(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    winding_down = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            yield b"x"
            await asyncio.Event().wait()  # the rest never comes: the answer comes first
        finally:
            winding_down.set()
            await asyncio.sleep(0.2)  # a body source slow to stop

    server = await asyncio.start_server(answer_at_once, "127.0.0.1", 0)
    try:
        conn = await UpstreamPool().connect(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        head = b"POST /x HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
        call = asyncio.ensure_future(conn.send(head, body(), chunked=True))
        await winding_down.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    finally:
        server.close()


async def test_an_endless_trailer_is_cut_not_held():
    # A trailer line is held by llhttp until its end: one that never ends would fill memory.
    written, served = 0, asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(256):  # 16 MiB in all, unless berth stops reading it
                writer.write(b"a" * 65536)
                await writer.drain()
                written += 1
        writer.close()
        served.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        conn = await UpstreamPool().connect(address)
        response = await conn.send(GET, None)
        with pytest.raises(UpstreamError, match="trailer over"):
            await response.read()
        assert conn._transport.is_closing()
        async with asyncio.timeout(10):
            await served.wait()
        assert written < 256  # the rest was refused: the connection closed
    finally:
        server.close()


async def test_a_padded_content_length_cut_short_is_an_error_not_a_whole_answer():
    async with Scripted(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 100 \r\n\r\nonly ten..",
                        close_after=True) as server:
        with pytest.raises(UpstreamError, match="mid-answer"):
            await call(UpstreamPool(), server.address)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * 200 + b"\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
])
async def test_what_is_not_a_plain_answer_is_an_error(answer):
    async with Scripted(lambda _: answer) as server:
        with pytest.raises(UpstreamError, match="not HTTP"):
            await call(UpstreamPool(), server.address)


def big_answer(size: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size


async def test_a_relay_hands_on_every_byte_and_stops_reading_while_the_sink_is_full():
    size = 8 * 1024 ** 2
    async with Scripted(lambda _: big_answer(size)) as server:
        pool = UpstreamPool()
        conn = await pool.connect(server.address)
        response = await conn.send(GET, None)
        room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        got: list[int] = []

        def sink(chunk: bytes) -> asyncio.Future[None] | None:
            got.append(len(chunk))
            return None if room.done() else room  # full until the test makes room

        relay = asyncio.create_task(response.relay(sink))
        await asyncio.sleep(0.2)
        assert 0 < sum(got) < 1024 ** 2  # the replica's socket is not read meanwhile
        room.set_result(None)
        await asyncio.wait_for(relay, 5)
        assert sum(got) == size
        pool.keep_or_close(conn)
        assert await asyncio.wait_for(call(pool, server.address), 5) == (200, b"x" * size)
        assert server.connections == 1


async def test_a_connection_left_unread_by_a_full_relay_is_not_reused():
    # Bytes the replica sends past its answer while nothing reads must never be taken for
    # the next call's answer (found in review: the next call got b"STALE").
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTALE"
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(OK)
                if connections == 1:  # the first connection: an answer nobody asked for, later
                    await asyncio.sleep(0.1)
                    writer.write(stale)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        pool = UpstreamPool()
        conn = await pool.connect(address)
        response = await conn.send(GET, None)
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(response.relay(lambda _: never), 2)  # the client never reads
        await asyncio.sleep(0.2)  # the stale answer is in the socket, unread
        assert conn.reading_paused
        pool.keep_or_close(conn)
        assert await asyncio.wait_for(call(pool, address), 2) == (200, b"ok")
        assert connections == 2
    finally:
        server.close()


async def test_a_sink_that_fails_ends_the_relay_and_the_connection():
    async with Scripted(lambda _: big_answer(8 * 1024 ** 2)) as server:
        pool = UpstreamPool()
        conn = await pool.connect(server.address)
        response = await conn.send(GET, None)
        calls = 0

        def sink(chunk: bytes) -> None:
            nonlocal calls
            calls += 1
            raise ConnectionResetError("the client left")

        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(response.relay(sink), 2)
        await asyncio.sleep(0.05)
        assert calls == 1  # nothing more reached it
        pool.keep_or_close(conn)
        await asyncio.wait_for(call(pool, server.address), 5)
        assert server.connections == 2
