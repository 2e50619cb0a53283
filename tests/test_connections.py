"""The listener's connection limits over real loopback sockets: the header deadline, keep-alive,
and the caps on open connections, in total and per client address.

Timings are scaled down (a 0.3 s header deadline, a 1 s keep-alive) and chosen so that each
check tells the guard from aiohttp alone: without it, a connection that never completes its
headers is only closed by the keep-alive timer, and no connection is ever refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import uvloop
from aiohttp import web

from berth.daemon.connections import ConnectionLimits, GuardedSite, client_key, header_deadline

HEADER_S = 0.3
KEEPALIVE_S = 1.0
CUT_BY = HEADER_S + 0.3  # the guard closes by then; aiohttp alone only at KEEPALIVE_S
STREAM_CHUNKS, STREAM_GAP_S = 8, 0.1  # /slow streams for 0.8 s: well past HEADER_S


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def slow(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    for _ in range(STREAM_CHUNKS):
        await response.write(b"x")
        await asyncio.sleep(STREAM_GAP_S)
    await response.write_eof()
    return response


@dataclass
class Served:
    """A tiny app served through the guard, and the clients opened to it (closed at the end)."""

    site: GuardedSite
    clients: list[Client] = field(default_factory=list)

    async def open(self, source: str = "127.0.0.1") -> Client:
        """A new connection from loopback address `source`."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.site.port,
                                                       local_addr=(source, 0))
        self.clients.append(Client(reader, writer))
        return self.clients[-1]


@contextlib.asynccontextmanager
async def serving(total: int = 4096, per_client: int = 256) -> AsyncIterator[Served]:
    """The app on 127.0.0.1, an unused port, with the given caps."""
    app = web.Application(middlewares=[header_deadline])
    app.router.add_get("/", hello)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, keepalive_timeout=KEEPALIVE_S, handler_cancellation=True,
                           access_log=None, shutdown_timeout=1)
    await runner.setup()
    served = None
    try:
        site = GuardedSite(runner, "127.0.0.1", 0, ConnectionLimits(HEADER_S, total, per_client))
        await site.start()
        served = Served(site)
        yield served
    finally:
        for client in served.clients if served else ():
            await client.close()
        await runner.cleanup()


class Client:
    """One raw HTTP/1.1 connection, from a chosen loopback address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def get(self, path: str = "/") -> bytes:
        """GET `path` on this connection; its body, which must come with a 200."""
        self.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 200 "), head
        if b"transfer-encoding: chunked" in head.lower():
            return await asyncio.wait_for(self._chunks(), 3)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return await asyncio.wait_for(self.reader.readexactly(length), 3)

    async def _chunks(self) -> bytes:
        body = b""
        while size := int((await self.reader.readline()).strip(), 16):
            body += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
        await self.reader.readexactly(2)
        return body

    async def closed_after(self, limit: float = 3.0) -> float:
        """Seconds until the server closes this connection; fails past `limit`."""
        start = time.monotonic()
        try:
            data = await asyncio.wait_for(self.reader.read(), limit)
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            pytest.fail(f"the server kept the connection open for {limit} s")
        assert data == b"", data
        return time.monotonic() - start

    async def refused(self) -> None:
        """The server answered 503 too_many_connections at once and closed."""
        try:
            data = await asyncio.wait_for(self.reader.read(), 1)
        except TimeoutError:
            pytest.fail("the connection was accepted: it stayed open without a 503")
        except ConnectionResetError:
            return  # refused; the reset beat the 503 to us
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), data
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "too_many_connections"

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serving() as s:
        yield s


async def test_partial_headers_closed_at_deadline(served: Served) -> None:
    client = await served.open()
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
    elapsed = await client.closed_after()
    print(f"partial headers: closed after {elapsed:.3f} s")
    assert HEADER_S * 0.9 <= elapsed < CUT_BY


async def test_dripped_headers_closed_at_deadline(served: Served) -> None:
    client = await served.open()
    client.send(b"GET / HTTP/1.1\r\n")

    async def drip() -> None:  # a byte at a time keeps the socket busy, never the request whole
        while True:
            client.send(b"X")
            await asyncio.sleep(0.05)

    dripping = asyncio.create_task(drip())
    try:
        elapsed = await client.closed_after()
    finally:
        dripping.cancel()
    print(f"dripped headers: closed after {elapsed:.3f} s")
    assert elapsed < CUT_BY


async def test_silent_connection_closed_at_deadline(served: Served) -> None:
    client = await served.open()
    elapsed = await client.closed_after()
    print(f"silent connection: closed after {elapsed:.3f} s")
    assert HEADER_S * 0.9 <= elapsed < CUT_BY
    await until(lambda: served.site.guard.open_connections == 0)


async def test_keepalive_idles_then_closes(served: Served) -> None:
    client = await served.open()
    assert await client.get() == b"hello"
    await asyncio.sleep(HEADER_S + 0.2)  # idle past the header deadline: not the idle limit
    assert await client.get() == b"hello"
    elapsed = await client.closed_after()
    print(f"idle keep-alive: closed after {elapsed:.3f} s")
    assert KEEPALIVE_S * 0.9 <= elapsed < KEEPALIVE_S + 0.5


async def test_deadline_applies_to_each_request(served: Served) -> None:
    client = await served.open()
    assert await client.get() == b"hello"
    await asyncio.sleep(0.1)
    client.send(b"GET / HTTP/1.1\r\n")  # the next request starts, and stalls
    elapsed = await client.closed_after()
    print(f"partial second request: closed after {elapsed:.3f} s")
    assert HEADER_S * 0.9 <= elapsed < CUT_BY


async def test_slow_stream_is_not_cut(served: Served) -> None:
    client = await served.open()
    start = time.monotonic()
    assert await client.get("/slow") == b"x" * STREAM_CHUNKS
    took = time.monotonic() - start
    print(f"slow stream: whole after {took:.3f} s")
    assert took > 2 * HEADER_S
    assert await client.get() == b"hello"  # and the connection is still good


async def test_cap_per_client() -> None:
    async with serving(per_client=3) as served:
        clients = [await served.open() for _ in range(3)]
        for client in clients:
            assert await client.get() == b"hello"
        await (await served.open()).refused()
        other = await served.open("127.0.0.2")  # another client is not held back
        assert await other.get() == b"hello"
        for client in clients:
            assert await client.get() == b"hello"
        await clients.pop().close()
        await until(lambda: served.site.guard.from_client("127.0.0.1") == 2)
        again = await served.open()
        assert await again.get() == b"hello"
        assert served.site.guard.refused == 1


async def test_cap_in_total() -> None:
    async with serving(total=3) as served:
        clients = [await served.open(source) for source in
                   ("127.0.0.1", "127.0.0.1", "127.0.0.2")]
        for client in clients:
            assert await client.get() == b"hello"
        await (await served.open("127.0.0.3")).refused()
        for client in clients:
            assert await client.get() == b"hello"
        await clients.pop().close()
        await until(lambda: served.site.guard.open_connections == 2)
        again = await served.open("127.0.0.3")
        assert await again.get() == b"hello"


def test_under_uvloop() -> None:
    """berthd runs uvloop: the deadline, the refusal and a long stream, at once, there too."""
    async def scenario() -> None:
        async with serving(per_client=2) as served:
            stalled, streaming = await served.open(), await served.open()
            stalled.send(b"GET / HTTP/1.1\r\n")
            await (await served.open()).refused()
            cut, body = await asyncio.gather(stalled.closed_after(), streaming.get("/slow"))
            assert cut < CUT_BY
            assert body == b"x" * STREAM_CHUNKS

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_site_needs_the_middleware() -> None:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    try:
        with pytest.raises(RuntimeError, match="header_deadline"):
            GuardedSite(runner, "127.0.0.1", 0, ConnectionLimits())
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("peer", "key"), [
    (("127.0.0.1", 5000), "127.0.0.1"),
    (("::ffff:10.0.0.7", 5000, 0, 0), "10.0.0.7"),
    (("2001:db8::1", 5000, 0, 0), "2001:db8::1"),
    (None, "None"),
])
def test_client_key(peer: object, key: str) -> None:
    assert client_key(peer) == key

