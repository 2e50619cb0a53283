"""The messages of berth's own front (daemon/front.py): a model call's request as llhttp
parsed it, its body as it arrives, and its answer written straight to the client's connection.
They satisfy what the proxy core needs (http_types.CallRequest, Replier, Answer); what they
need of the connection is `Connection`."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from berth.daemon.chunks import chunks_of, no_chunks
from berth.daemon.errors import error_document
from berth.daemon.http_types import Answer, Headers, media_type

BODY_HIGH = 256 * 1024  # request body bytes queued before the client's socket stops being read
# Why the client's socket is not read (Connection.hold / release): it is read again only once
# no reason is left, so that the end of one (a body taken) does not undo another.
HOLD_BODY = 1  # a request body queued past BODY_HIGH
HOLD_PIPELINED = 2  # requests parsed and waiting for the calls before them
HOLD_BACKLOG = 4  # bytes for aiohttp waiting for the front's calls before them
HOLD_CLOSING = 8  # the connection ends once its answer is out: nothing more is read
PREFIX = b"/invoke/"
NO_BODY = frozenset({204, 304})
# Request bytes to text as aiohttp decodes them, so that the proxy core's encoding back
# (proxy.upstream_request) gives the replica exactly the bytes the client sent.
AS_AIOHTTP = ("utf-8", "surrogateescape")


class Connection(Protocol):
    """What requests and answers need of the client connection (front.Front)."""

    app: web.Application
    loop: asyncio.AbstractEventLoop
    remote: str | None
    close_after: bool
    cutting: bool

    @property
    def full(self) -> asyncio.Future[None] | None: ...

    def write(self, data: bytes) -> None: ...

    def write_parts(self, parts: tuple[bytes, ...]) -> None: ...

    async def drain(self) -> None: ...

    def hold(self, why: int) -> None: ...

    def release(self, why: int) -> None: ...


class Target:
    __slots__ = ("raw_path", "raw_query_string")

    def __init__(self, url: str) -> None:
        self.raw_path, _, self.raw_query_string = url.partition("?")


class RequestBody:
    """A request body as it arrives, read by the call while the client still sends it."""

    __slots__ = ("_chunks", "_front", "_size", "_waiter", "done", "failed")

    def __init__(self, front: Connection) -> None:
        self._front = front
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self.done = False
        self.failed = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return  # (none comes from llhttp; b"" would read as the body's end)
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > BODY_HIGH:
            self._front.hold(HOLD_BODY)
        self._wake()

    def end(self, failed: bool = False) -> None:
        self.done, self.failed = not failed, failed
        self._wake()

    @property
    def size(self) -> int:
        """Body bytes arrived and not yet taken."""
        return self._size

    def peek(self) -> bytes:
        """The body, once `done`, left in place (the fast path reads an OpenAI call's model
        from it before it knows the call can be its own)."""
        assert self.done
        if len(self._chunks) > 1:
            self._chunks = deque((b"".join(self._chunks),))
        return self._chunks[0] if self._chunks else b""

    def whole(self) -> bytes:
        """The body, once `done`: all of it, taken (the fast path's; daemon/fast_call.py)."""
        assert self.done
        chunks, self._chunks = self._chunks, deque()
        if self._size > BODY_HIGH:  # (held for it)
            self._front.release(HOLD_BODY)
        self._size = 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def discard(self) -> None:
        """Its call is over: what arrived of it and was not taken goes (and so its hold)."""
        if self._size > BODY_HIGH:
            self._front.release(HOLD_BODY)
        self._chunks.clear()
        self._size = 0

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        """The body in the pieces it arrived in (`n` is aiohttp's signature; unused)."""
        return chunks_of(self.next_chunk)

    async def next_chunk(self) -> bytes:
        """The next piece as it arrived, once it has; b"" at the body's end."""
        while not self._chunks:
            if self.done:
                return b""
            if self.failed:
                raise ConnectionResetError("the client left before sending its body")
            self._waiter = self._front.loop.create_future()
            await self._waiter
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        if self._size <= BODY_HIGH:
            self._front.release(HOLD_BODY)
        return chunk


class NoBody:
    """The body of a request that has none: already whole (one, shared: it never changes)."""

    __slots__ = ()
    done = True
    failed = False

    def end(self, failed: bool = False) -> None:
        pass

    size = 0

    def discard(self) -> None:
        pass

    def peek(self) -> bytes:
        return b""

    def whole(self) -> bytes:
        return b""

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        return no_chunks()


EMPTY_BODY = NoBody()


class FrontRequest:
    """A model call's request as the front parsed it (satisfies http_types.CallRequest)."""

    __slots__ = ("app", "body_exists", "content", "content_length", "expect_continue",
                 "head_only", "headers", "host", "json_body", "keep_alive", "match_info",
                 "method", "openai", "raw_headers", "rel_url", "remote", "scheme", "version")

    def __init__(self, front: Connection, method: str, url: str,
                 raw_headers: list[tuple[bytes, bytes]], keep_alive: bool, version: str,
                 openai: bool) -> None:
        self.app = front.app
        self.method = method
        self.raw_headers = raw_headers  # as they came: what goes on to the replica
        headers = self.headers = CIMultiDict(
            [(name.decode(*AS_AIOHTTP), value.decode(*AS_AIOHTTP)) for name, value in raw_headers])
        self.rel_url = Target(url)
        self.openai = openai  # an OpenAI JSON route, else /invoke/{name}/{path}
        self.match_info: dict[str, str] = {}
        if not openai:
            name, _, tail = self.rel_url.raw_path[len(PREFIX):].partition("/")
            self.match_info = {"name": unquote(name) if "%" in name else name,
                               "path": unquote(tail) if "%" in tail else tail}
        self.remote = front.remote
        self.scheme = "http"
        self.host = headers.get("Host", "")
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None
        self.body_exists = bool(self.content_length) or "Transfer-Encoding" in headers
        self.content: RequestBody | NoBody = RequestBody(front) if self.body_exists else \
            EMPTY_BODY
        self.keep_alive = keep_alive
        self.version = version
        self.head_only = method == "HEAD"
        self.expect_continue = headers.get("Expect", "").lower() == "100-continue"
        # An OpenAI call's whole JSON body as the fast path parsed it: the task's way, if
        # the call goes there (a stream, an error to tell), does not parse it again.
        self.json_body: dict[str, Any] | None = None


class FrontAnswer:
    """An answer written straight to the connection (satisfies http_types.Answer)."""

    __slots__ = ("_chunked", "_front", "_head_only", "_headers", "done", "status")

    def __init__(self, front: Connection, status: int, headers: Headers, chunked: bool,
                 head_only: bool) -> None:
        self._front = front
        self.status = status
        self._headers = headers
        self._chunked = chunked
        self._head_only = head_only
        self.done = False

    @property
    def content_type(self) -> str:
        """Its media type, lower-case (looked up when asked: most answers are never asked)."""
        return media_type(next((value for name, value in self._headers
                                if name.lower() == b"content-type"), b""))

    async def write(self, data: bytes) -> None:
        if data and not self._head_only:
            self.write_now(data)
            await self._front.drain()

    def write_now(self, data: bytes) -> asyncio.Future[None] | None:
        """`write` from a relay's callback: no waiting; the future to wait on while the
        client's buffer is full (http_types.WritesNow)."""
        if data and not self._head_only:
            if self._chunked:
                self._front.write_parts((b"%x\r\n" % len(data), data, b"\r\n"))
            else:
                self._front.write(data)
        return self._front.full

    async def write_eof(self, data: bytes = b"") -> None:
        if self.done:
            return
        await self.write(data)
        self.done = True
        if self._chunked and not self._head_only:
            self._front.write(b"0\r\n\r\n")
        await self._front.drain()

    def force_close(self) -> None:
        self._front.close_after = self._front.cutting = True

    def cut(self) -> None:
        self.force_close()  # (not done: the connection closes once what was written is out)


class FrontReplier:
    """Makes one call's answer on the front (satisfies http_types.Replier)."""

    __slots__ = ("_front", "answer", "request")

    def __init__(self, front: Connection, request: FrontRequest) -> None:
        self._front = front
        self.request = request
        self.answer: FrontAnswer | None = None

    def whole(self, status: int, reason: str, headers: Headers, body: bytes) -> Answer:
        head = self._head(status, reason, headers, b"Content-Length: %d\r\n" % len(body))
        self._front.write(head if self.request.head_only else head + body)
        answer = self.answer = self._answer(status, headers, chunked=False)
        answer.done = True
        return answer

    async def start(self, status: int, reason: str, headers: Headers,
                    length: int | None) -> Answer:
        bodiless = self.request.head_only or status in NO_BODY
        chunked = length is None and not bodiless and self.request.version == "1.1"
        if length is None and not bodiless and not chunked:
            self._front.close_after = True  # an HTTP/1.0 client: the body ends at the close
        framing = b"Transfer-Encoding: chunked\r\n" if chunked else \
            b"Content-Length: %d\r\n" % length if length is not None and status not in NO_BODY \
            else b""
        self._front.write(self._head(status, reason, headers, framing))
        self.answer = self._answer(status, headers, chunked)
        await self._front.drain()
        return self.answer

    def _answer(self, status: int, headers: Headers, chunked: bool) -> FrontAnswer:
        return FrontAnswer(self._front, status, headers, chunked,
                           self.request.head_only or status in NO_BODY)

    def _head(self, status: int, reason: str, headers: Headers, framing: bytes) -> bytes:
        if not (reason.isascii() and reason.isprintable()):
            reason = ""  # the replica's reason phrase, unless it holds control bytes
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, (reason or _phrase(status)).encode())]
        lines += [b"%s: %s\r\n" % line for line in headers]
        lines.append(framing)
        if not self.request.keep_alive:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_body(code: str, message: str) -> bytes:
    return json.dumps(error_document(code, message)).encode()


def error_head_and_body(status: int, code: str, message: str,
                        headers: dict[str, str]) -> bytes:
    """berth's JSON error, as a whole HTTP/1.1 answer that closes the connection."""
    body = error_body(code, message)
    extra = "".join(f"{key}: {value}\r\n" for key, value in headers.items())
    return (f"HTTP/1.1 {status} {_phrase(status)}\r\nContent-Type: application/json; "
            f"charset=utf-8\r\nContent-Length: {len(body)}\r\n{extra}"
            "\r\n").encode("latin-1", "replace") + body
