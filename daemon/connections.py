"""Connection limits for the HTTP listener: a header deadline and caps on open connections.

aiohttp reads a request's headers for as long as the client cares to drip them, and takes
every connection it is offered, so a few hundred idle sockets hold berthd's file descriptors
for good. Between the listening socket and aiohttp this module puts:

- a header deadline: the complete headers of a request must arrive within
  `header_timeout_s` of connecting, and within that time of the first byte of each later
  request on a keep-alive connection; else the connection is closed. The clock stops while
  a request is served (the `header_deadline` middleware tells it when), so long calls and
  slow streams are never cut. A keep-alive connection that sends nothing after a response is
  left to aiohttp's `keepalive_timeout`, which also closes one that sent part of a pipelined
  request while the previous one was served.
- caps on open connections, in total and per client address: a connection beyond either is
  answered `503 too_many_connections` at once and closed, before aiohttp sees it.

Use: put `header_deadline` first in the app's middlewares before `runner.setup()`, then
listen with `GuardedSite` instead of `web.TCPSite`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import time
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from yarl import URL

from berth.daemon.errors import error_response
from berth.daemon.front import Front
from berth.daemon.keys import ROUTER

log = structlog.get_logger("berth.connections")

WARN_EVERY_S = 60.0  # a flood of refusals logs one warning a minute, not one per connection


def _refusal() -> bytes:
    body = json.dumps({"error": {"code": "too_many_connections",
                                 "message": "too many open connections; retry later"}},
                      separators=(",", ":")).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


REFUSAL = _refusal()  # immutable bytes, built once: refusing must cost next to nothing


@dataclass(frozen=True)
class ConnectionLimits:
    """What a listener allows (the `daemon.*` settings of the same names)."""

    header_timeout_s: float = 10.0
    max_connections: int = 4096
    max_connections_per_client: int = 256
    keepalive_timeout_s: float = 15.0  # the front's idle connections (aiohttp: its runner's)


def client_key(peername: Any) -> str:
    """The address a connection counts against: its peer IP, an IPv4-mapped IPv6 address as
    IPv4 (one client reaching a dual-stack socket is one client)."""
    host = peername[0] if isinstance(peername, tuple) and peername else str(peername)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class BerthRequestHandler(RequestHandler):
    """aiohttp's handler, answering requests its parser refused in berth's error shape: 431
    for a header block over the limits, 400 for anything else (among them request smuggling:
    Content-Length with Transfer-Encoding, or two Content-Lengths). Such bytes come from the
    network and are expected: logged at debug, never with a traceback."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, BadHttpMessage):
            return super().handle_error(request, status, exc, message)
        too_large = isinstance(exc, LineTooLong) or "Too many headers" in str(exc)
        status, code = (431, "headers_too_large") if too_large else (400, "bad_request")
        text = str(exc.message).splitlines()[0][:200] if exc.message else "bad request"
        log.debug("connections.bad_request", client=request.remote, status=status, reason=text)
        response = error_response(status, code, f"malformed request: {text}")
        response.force_close()  # the rest of the connection's bytes cannot be trusted
        return response


class ConnectionGuard:
    """A protocol factory for `loop.create_server` in front of an aiohttp `web.Server`.

    Counts open connections by client address; each connection gets a `GuardedConnection`,
    which hands it to a fresh aiohttp RequestHandler if the caps allow, else refuses it."""

    def __init__(self, server: web.Server, limits: ConnectionLimits,
                 app: web.Application | None = None) -> None:
        self.server = server
        self.limits = limits
        # berth's app: model calls are served by the front (daemon/front.py), not aiohttp
        self.app = app if app is not None and ROUTER in app else None
        self.refused = 0  # connections refused since start, for logs and metrics
        self.fronts: set[Front] = set()  # connections the front serves (aiohttp's are its own)
        self._fronts_gone = asyncio.Event()
        self._total = 0
        self._per_client: dict[str, int] = {}
        self._warned_at = -WARN_EVERY_S

    def __call__(self) -> GuardedConnection:
        return GuardedConnection(self)

    async def close_fronts(self, grace_s: float) -> None:
        """At shutdown, with the listener closed: idle front connections close now, busy
        ones after their answer; whatever still runs after `grace_s` is cut."""
        for front in list(self.fronts):
            if not front.shutdown():
                self.forget_front(front)  # (aiohttp's to close, next)
        if self.fronts:
            self._fronts_gone.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._fronts_gone.wait(), grace_s)
        for front in list(self.fronts):
            front.abort()

    def forget_front(self, front: Front) -> None:
        self.fronts.discard(front)
        if not self.fronts:
            self._fronts_gone.set()

    def request_handler(self) -> RequestHandler:
        """What `server()` makes, but answering unparseable requests in berth's shape."""
        return BerthRequestHandler(self.server, loop=asyncio.get_running_loop(),
                                   **self.server._kwargs)

    @property
    def open_connections(self) -> int:
        return self._total

    def from_client(self, key: str) -> int:
        """How many connections `key` has open."""
        return self._per_client.get(key, 0)

    def admit(self, key: str) -> bool:
        """Count a new connection from `key` and say True, or say False if a cap is reached
        (and count nothing: a refused connection is never `release`d)."""
        if self._total >= self.limits.max_connections:
            return self._refuse(key, "daemon.max_connections")
        if self.from_client(key) >= self.limits.max_connections_per_client:
            return self._refuse(key, "daemon.max_connections_per_client")
        self._total += 1
        self._per_client[key] = self.from_client(key) + 1
        return True

    def release(self, key: str) -> None:
        """Uncount an admitted connection that closed."""
        self._total -= 1
        left = self.from_client(key) - 1
        if left > 0:
            self._per_client[key] = left
        else:
            del self._per_client[key]  # no entry per client ever seen: the map stays small

    def _refuse(self, key: str, limit: str) -> bool:
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("connections.refused", message="connections refused: limit reached",
                        limit=limit, client=key, open=self._total,
                        refused_since_start=self.refused)
        return False


class GuardedConnection(asyncio.Protocol):
    """One accepted connection: admits or refuses it, runs its header deadline, and passes
    its bytes to berth's front for model calls (daemon/front.py), which hands the connection
    to an aiohttp RequestHandler for anything else (or at once, for an app without calls)."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._handler: RequestHandler | None = None  # aiohttp's, once it has the connection
        self._front: Front | None = None  # model calls, until aiohttp has it all
        self._transport: asyncio.Transport | None = None
        self._key = ""
        self._admitted = False  # counted by the guard, so to be released when it closes
        # One deadline at a time: the current request's head (header_timeout_s), or, on a
        # front connection between calls, keepalive_timeout_s; None while a request is served.
        # The timer only checks it, never more than `_step` ahead, so moving the deadline on
        # each call costs no timer of its own (calls on a kept-alive connection come fast).
        self._deadline: float | None = None
        self._idle = False  # the deadline is the idle one, not a request head's
        self._timer: asyncio.TimerHandle | None = None
        self._serving = False  # a request's handler is running: the clock is stopped
        self._awaiting = False  # between requests: the next byte starts a head's clock

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._loop = asyncio.get_running_loop()  # once: each ask is a getpid() on 3.11
        self._transport = cast(asyncio.Transport, transport)
        self._key = client_key(transport.get_extra_info("peername"))
        if not self._guard.admit(self._key):
            # Refused before reading anything: a client that already sent its request may
            # see a reset instead of the 503, but the socket is freed at once either way.
            self._transport.write(REFUSAL)
            self._transport.close()
            return
        self._admitted = True
        limits = self._guard.limits
        self._step = min(limits.header_timeout_s, limits.keepalive_timeout_s)
        self._set_deadline(limits.header_timeout_s, idle=False)
        if self._guard.app is not None:
            self._front = Front(self, self._guard.app, self._transport)
            self._guard.fronts.add(self._front)
        else:
            self.to_aiohttp(None)

    def to_aiohttp(self, raw: bytes | None) -> RequestHandler:
        """Give the connection to an aiohttp handler: for good, with the bytes so far, when
        `raw` is given; else the front stays in between and feeds it requests."""
        assert self._transport is not None
        handler = self._handler = self._guard.request_handler()
        handler.connection_made(self._transport)
        if raw is not None:
            if self._front is not None:
                self._guard.forget_front(self._front)
            self._front = None
            handler.data_received(raw)
        return handler

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        handler, self._handler = self._handler, None
        front, self._front = self._front, None
        try:
            if front is not None:
                self._guard.forget_front(front)
                front.connection_lost()
            if handler is not None:
                handler.connection_lost(exc)
        finally:
            if self._admitted:
                self._admitted = False
                self._guard.release(self._key)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return  # refused and closing: whatever the client sent is dropped
        first = self._awaiting and not self._serving  # the next request's first byte
        if first:
            self._awaiting = False
        if self._front is not None:
            self._front.feed(data)
        elif self._handler is not None:
            self._handler.data_received(data)
        # Its head's clock starts now, unless the head came whole and its call started (the
        # most common: no clock to set at all); aiohttp's handler starts its own call later.
        if first and not self._serving:
            self._set_deadline(self._guard.limits.header_timeout_s, idle=False)

    def eof_received(self) -> None:
        if self._handler is not None:
            self._handler.eof_received()  # None, as aiohttp's: the transport closes itself

    def pause_writing(self) -> None:
        if self._front is not None:
            self._front.pause_writing()
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._front is not None:
            self._front.resume_writing()
        if self._handler is not None:
            self._handler.resume_writing()

    def request_started(self) -> None:
        """A request's headers are complete and its handler runs: stop the clock."""
        self._serving = True
        self._deadline = None

    def request_finished(self) -> None:
        """The handler is done: the next request's clock starts at its first byte. A front
        connection left idle closes after keepalive_timeout_s (aiohttp's do so themselves)."""
        self._serving = False
        self._awaiting = True
        if self._front is not None and self._front.idle:
            self._set_deadline(self._guard.limits.keepalive_timeout_s, idle=True)
        else:
            self._deadline = None

    def _set_deadline(self, seconds: float, idle: bool) -> None:
        now = self._loop.time()
        self._deadline, self._idle = now + seconds, idle
        if self._timer is None:
            self._timer = self._loop.call_at(min(self._deadline, now + self._step), self._check)

    def _check(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # a request is being served: the next deadline arms the timer again
        now = self._loop.time()
        if now < deadline:
            self._timer = self._loop.call_at(min(deadline, now + self._step), self._check)
            return
        if self._transport is not None and not self._transport.is_closing():
            if self._idle:
                log.debug("connections.idle_timeout", message="idle connection closed",
                          client=self._key, timeout_s=self._guard.limits.keepalive_timeout_s)
            else:
                log.debug("connections.header_timeout",
                          message="connection closed: no complete request headers in time",
                          client=self._key, timeout_s=self._guard.limits.header_timeout_s)
            self._transport.close()  # connection_lost follows, and tells the handler


def _connection(request: web.Request) -> GuardedConnection | None:
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, GuardedConnection) else None


@web.middleware
async def header_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Stop the connection's header clock while this request is served. Must come first in
    the middlewares, so that it wraps everything the request does; a no-op on connections
    not made through a ConnectionGuard (tests' clients, other sites)."""
    connection = _connection(request)
    if connection is None:
        return await handler(request)
    connection.request_started()
    try:
        return await handler(request)
    finally:
        connection.request_finished()


class GuardedSite(web.BaseSite):
    """A TCP listener like `web.TCPSite` whose connections pass through a ConnectionGuard.

    Make it after `runner.setup()`, from an app whose first middleware is `header_deadline`
    (checked: without it every request would be cut at the header deadline). `port` is the
    bound port once started, for a listen address that asks for port 0."""

    __slots__ = ("_bound_port", "_grace_s", "_host", "_port", "guard")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: ConnectionLimits,
                 *, backlog: int = 128, grace_s: float = 60.0) -> None:
        super().__init__(runner, backlog=backlog)
        if isinstance(runner, web.AppRunner) and header_deadline not in runner.app.middlewares:
            raise RuntimeError("GuardedSite needs connections.header_deadline among the app's "
                               "middlewares, added before runner.setup()")
        assert runner.server is not None  # BaseSite raised otherwise
        self.guard = ConnectionGuard(runner.server, limits, runner.app if isinstance(
            runner, web.AppRunner) else None)
        self._host = host
        self._port = port
        self._bound_port: int | None = None
        self._grace_s = grace_s  # for the front's calls in flight at stop (aiohttp: its own)

    @property
    def port(self) -> int:
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self.port))

    async def stop(self) -> None:
        """Stop listening, then let the front's calls in flight finish (runner.cleanup then
        does the same for aiohttp's requests)."""
        await super().stop()
        await self.guard.close_fronts(self._grace_s)

    async def start(self) -> None:
        """Listen as TCPSite.start does, with the guard as the protocol factory."""
        await super().start()  # registers the site with the runner, which stops it on cleanup
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self.guard, self._host, self._port,
                                          backlog=self._backlog)
        self._server = server
        self._bound_port = server.sockets[0].getsockname()[1] if server.sockets else self._port
