"""The floor under berth's data plane: the least a Python proxy can do per call on this box.

    python bench/floor_proxy.py UPSTREAM_HOST UPSTREAM_PORT LISTEN_PORT

Not berth and not for use: uvloop and llhttp (httptools) as berth uses them, a task per call
and a pooled upstream connection, but no routing, slots, auth, limits, timeouts, metrics,
header rules, flow control or error handling. bench/proxy_vs_nginx.py --floor runs it beside
berth and nginx, so that berth's own per-call cost shows as the gap between berth and this.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import httptools
import uvloop

PREFIX = b"/invoke/fast"


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] | None = None
        self.fields: list[tuple[bytes, bytes]] = []
        self.body = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.answer is not None
        self.answer.set_result((self.parser.get_status_code(), self.fields, self.body))
        self.fields, self.body = [], b""


class Front(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: tuple[str, int],
                 pool: list[Upstream]) -> None:
        self.loop, self.upstream, self.pool = loop, upstream, pool
        self.parser = httptools.HttpRequestParser(self)
        self.fields: list[tuple[bytes, bytes]] = []
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_message_complete(self) -> None:
        self.loop.create_task(self.serve(self.url, self.fields))
        self.fields = []

    async def serve(self, url: bytes, fields: list[tuple[bytes, bytes]]) -> None:
        conn = self.pool.pop() if self.pool else \
            (await self.loop.create_connection(Upstream, *self.upstream))[1]
        head = [b"GET ", url[len(PREFIX):], b" HTTP/1.1\r\nHost: upstream\r\n"]
        head += [b"%s: %s\r\n" % f for f in fields if f[0].lower() != b"host"]
        head.append(b"X-Request-Id: 1\r\n\r\n")
        conn.answer = self.loop.create_future()
        conn.transport.write(b"".join(head))
        status, answer_fields, body = await conn.answer
        self.pool.append(conn)
        out = [b"HTTP/1.1 %d OK\r\n" % status]
        out += [b"%s: %s\r\n" % f for f in answer_fields
                if f[0].lower() not in (b"connection", b"keep-alive")]
        out += [b"X-Berth-Replica: r1\r\n\r\n", body]
        if not self.transport.is_closing():  # (wrk closes its connections mid-call at its end)
            self.transport.write(b"".join(out))


def main() -> None:
    host, port, listen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    loop = uvloop.new_event_loop()
    pool: list[Upstream] = []
    loop.run_until_complete(loop.create_server(lambda: Front(loop, (host, port), pool),
                                               "127.0.0.1", listen))
    loop.run_forever()


if __name__ == "__main__":
    main()
