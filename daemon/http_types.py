"""What the data plane needs of an HTTP request and answer, as protocols, so that one proxy
core (daemon/proxy.py) serves calls arriving through aiohttp and through berth's own front
(daemon/front.py) alike. aiohttp's web.Request and web.StreamResponse satisfy them as they are."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Protocol

from aiohttp import web

Headers = list[tuple[bytes, bytes]]  # header lines in order, as bytes on the wire
JSON_TYPE = (b"Content-Type", b"application/json; charset=utf-8")


def media_type(value: bytes) -> str:
    """A Content-Type value's media type, lower-case, without its parameters."""
    return value.partition(b";")[0].strip().lower().decode("latin-1")


def as_lines(headers: Mapping[str, str]) -> Headers:
    """berth's own header lines (error answers: Retry-After, Allow) as Headers."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class Target(Protocol):
    @property
    def raw_path(self) -> str: ...

    @property
    def raw_query_string(self) -> str: ...


class BodyStream(Protocol):
    def iter_chunked(self, n: int) -> AsyncIterator[bytes]: ...


class HasHeaders(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...


class CallRequest(HasHeaders, Protocol):
    """A model call's request: method, target, headers, peer, and its body as it arrives."""

    @property
    def app(self) -> web.Application: ...

    @property
    def method(self) -> str: ...

    @property
    def match_info(self) -> Mapping[str, str]: ...

    @property
    def rel_url(self) -> Target: ...

    @property
    def raw_headers(self) -> Iterable[tuple[bytes, bytes]]: ...

    @property
    def remote(self) -> str | None: ...

    @property
    def scheme(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def body_exists(self) -> bool: ...

    @property
    def content(self) -> BodyStream: ...


class Answer(Protocol):
    """An answer on its way to the client, head already decided."""

    @property
    def status(self) -> int: ...

    @property
    def content_type(self) -> str: ...

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes = b"") -> None: ...

    def force_close(self) -> None: ...

    def cut(self) -> None:
        """End it so that the client sees it incomplete: no end of body is written (a
        chunked one would read as whole), and the connection closes."""


class WritesNow(Protocol):
    """An answer that can take a chunk without waiting (berth's front): a streamed body is
    then relayed from the replica connection's callback, with no task switch per chunk."""

    def write_now(self, data: bytes) -> asyncio.Future[None] | None: ...


class Replier(Protocol):
    """Makes the answers of one call: whole (small, one write) or started and streamed.
    `length` None on start: the body's size is not known (chunked, or to the close)."""

    def whole(self, status: int, reason: str, headers: Headers, body: bytes) -> Answer: ...

    async def start(self, status: int, reason: str, headers: Headers,
                    length: int | None) -> Answer: ...
