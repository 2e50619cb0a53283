"""HTTP/1.1 through the data plane, byte by byte: what berth's own replica client and the
listener in front of it could get wrong. A real berth listener (GuardedSite, as berthd runs
it) in front of real replicas; raw sockets where a well-behaved client library would not send
what a hostile or unusual client sends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from berth.daemon.app import build_app
from berth.daemon.connections import ConnectionLimits, GuardedSite, header_deadline
from helpers import endpoint, ready_count, wait_for

Raw = Callable[[bytes], Awaitable[bytes]]


@pytest.fixture
async def front(harness) -> AsyncIterator[Callable[..., Awaitable[tuple[str, object]]]]:
    """berth's app behind the listener berthd uses, on a loopback port; endpoint "h" ready."""
    runners: list[web.AppRunner] = []

    async def make(replicas: int = 1, **fields: object) -> tuple[str, object]:
        h = await harness()
        await h.reconciler.apply_specs(
            {"h": endpoint("h", min_replicas=replicas, public=True, **fields)}, "config")
        pool = h.reconciler.pool("h")
        await wait_for(pool, lambda: ready_count(pool) == replicas, what="ready")
        app = build_app(h.reconciler, h.reconciler.allocator)
        app.middlewares.insert(0, header_deadline)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = GuardedSite(runner, "127.0.0.1", 0, ConnectionLimits())
        await site.start()
        return f"127.0.0.1:{site.port}", pool

    yield make
    for runner in runners:
        await runner.cleanup()


async def raw(address: str, data: bytes, *, until: int = 1) -> bytes:
    """Send `data` on one connection; read until `until` answers' heads (and what came with
    them) arrived or the server closed."""
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    got = b""
    try:
        async with asyncio.timeout(5):
            while got.count(b"HTTP/1.1 ") < until or not got.endswith((b"}", b"\n")):
                more = await reader.read(65536)
                if not more:
                    break
                got += more
    finally:
        writer.close()
    return got


async def calls_seen(pool) -> int:
    replica = next(iter(pool.replicas.values()))
    async with aiohttp.ClientSession() as s, s.get(f"http://{replica.address}/stats") as r:
        return (await r.json())["calls"]


def bodies(answer: bytes) -> list[dict]:
    """The JSON bodies of the answers in `answer`, in order."""
    return [json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1 ")[0])
            for part in answer.split(b"HTTP/1.1 ")[1:]]


async def test_head_204_and_keep_alive_to_the_replica(front):
    address, _ = await front()
    async with aiohttp.ClientSession(f"http://{address}") as s:
        async with s.get("/invoke/h/echo") as get:
            length, port = get.headers["Content-Length"], (await get.json())["client_port"]
        async with s.head("/invoke/h/echo") as head:
            assert head.status == 200 and await head.read() == b""
            # HEAD says what GET would send (the echo differs only in "method")
            assert abs(int(head.headers["Content-Length"]) - int(length)) <= 1
        async with s.get("/invoke/h/status/204") as empty:
            assert empty.status == 204 and await empty.read() == b""
        async with s.get("/invoke/h/echo") as again:
            # HEAD and 204 ended at their heads: the same pooled connection carried all four
            assert (await again.json())["client_port"] == port


async def test_a_body_of_unknown_length_goes_chunked_and_whole(front):
    address, _ = await front()

    async def parts() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"part %d;" % i

    async with aiohttp.ClientSession(f"http://{address}") as s, \
            s.post("/invoke/h/echo", data=parts()) as resp:
        seen = await resp.json()
    assert resp.status == 200 and seen["body"] == "part 0;part 1;part 2;part 3;part 4;"
    assert seen["headers"].get("Transfer-Encoding") == "chunked"


async def test_expect_100_continue(front):
    address, _ = await front()
    head = (b"POST /invoke/h/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n")
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    seen = json.loads(await reader.readexactly(length))
    writer.close()
    assert seen["body"] == "hello"
    assert "expect" not in {k.lower() for k in seen["headers"]}  # berth answered it


async def test_pipelined_requests_are_answered_in_order(front):
    address, _ = await front()
    one = b"GET /invoke/h/echo/%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer = await raw(address, one % 1 + one % 2 + one % 3, until=3)
    assert [b["path"] for b in bodies(answer)] == ["/echo/1", "/echo/2", "/echo/3"]


@pytest.mark.parametrize("framing", [
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
])
async def test_smuggling_attempts_get_400_and_reach_no_replica(front, framing):
    address, pool = await front()
    before = await calls_seen(pool)
    answer = await raw(address, b"POST /invoke/h/sleep?s=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       + framing + b"GET /invoke/h/sleep?s=0 HTTP/1.1\r\nHost: x\r\n\r\n",
                       until=2)
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "bad_request"
    assert answer.count(b'"error"') == 1  # the connection closed: the tail was not served
    assert await calls_seen(pool) == before  # neither request reached the replica


@pytest.mark.parametrize("headers", [
    b"X-Big: " + b"a" * 9000 + b"\r\n",
    b"".join(b"X-H%d: v\r\n" % i for i in range(200)),
])
async def test_a_header_block_over_the_limit_gets_431(front, headers):
    address, pool = await front()
    before = await calls_seen(pool)
    answer = await raw(address, b"GET /invoke/h/sleep?s=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       + headers + b"\r\n")
    assert answer.split(b"\r\n")[0].endswith(b"431 Request Header Fields Too Large"), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "headers_too_large"
    assert await calls_seen(pool) == before


async def test_hop_by_hop_headers_stay_on_their_connection(front):
    address, _ = await front()
    headers = {"Connection": "keep-alive, X-Hop", "X-Hop": "secret", "Keep-Alive": "timeout=5",
               "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-End": "kept"}
    async with aiohttp.ClientSession(f"http://{address}") as s, \
            s.get("/invoke/h/echo", headers=headers) as resp:
        seen = {k.lower() for k in (await resp.json())["headers"]}
    assert "x-end" in seen
    assert not seen & {"x-hop", "keep-alive", "te", "proxy-authorization"}
