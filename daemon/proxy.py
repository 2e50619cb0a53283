"""Data plane: `ANY /invoke/{name}/{path}`, proxied to one replica, streaming both ways.

A call holds one replica slot from the moment it gets one until its response is over (or the
client leaves, which cancels the handler). Bodies are never held whole: the request streams to
the replica as it arrives, and the response streams back chunk by chunk as the replica writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from multidict import CIMultiDict

from berth.daemon.auth import Auth
from berth.daemon.config import EndpointSpec
from berth.daemon.deadlines import CallDeadline, Deadlines
from berth.daemon.errors import ApiError, as_api_error
from berth.daemon.http_types import Answer, CallRequest, Headers, Replier, WritesNow
from berth.daemon.keys import (
    AUTH,
    DATA_PLANE,
    LIMITS,
    METRICS,
    QUOTA,
    REQUEST_IDS,
    ROUTER,
    UPSTREAM,
    USAGE,
    DataPlane,
)
from berth.daemon.metering import UsageMeter, usage_in_json
from berth.daemon.models_api import error_object, presented_key
from berth.daemon.pacing import CallPacer
from berth.daemon.sse import SseRewriter
from berth.daemon.upstream import (
    NO_BODY,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamRefused,
    UpstreamResponse,
    UpstreamUnanswered,
)
from berth.daemon.usage import usage_asked
from berth.scheduler.errors import SchedulerError
from berth.scheduler.pool import EndpointPool
from berth.scheduler.replica import Replica
from berth.scheduler.router import Lease, Router

log = structlog.get_logger("berth.proxy")
T = TypeVar("T")


# Header names are compared as the bytes they came in (lower-cased): header lines cross berth
# as bytes, never decoded and encoded again.
# Headers that belong to one connection, not to the call (RFC 9110 7.6.1), plus the framing
# berth sets itself. Expect too: berth answered it (100 Continue) on the client's connection.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"trailers",
                        b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect"})
# Client-supplied forwarding headers are dropped: berth sets them itself (forwarded_headers).
FORWARDING = frozenset({b"forwarded", b"x-forwarded-for", b"x-forwarded-proto",
                        b"x-forwarded-host", b"x-real-ip"})
# X-Request-Id is set by berth from the client's or made (never sent twice)
REQUEST_ONLY = frozenset({b"authorization", b"x-berth-replica", b"x-request-id"}) | FORWARDING
OPENAI_ONLY = REQUEST_ONLY | {b"x-api-key"}  # berth's key on the OpenAI routes, as SDKs send it
ANSWER_OWN = frozenset({b"x-berth-replica", b"x-request-id"})  # berth sets these on answers
CHUNK = 64 * 1024
SMALL_BODY = 64 * 1024  # answers of known length up to this go out in one write
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # retried elsewhere if left unanswered


class RequestIds:
    """X-Request-Id values for calls that bring none: a random prefix per process and a
    counter (os.urandom per call was a getrandom() system call on every call)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


class ReplicaRefused(Exception):
    """The replica refused the connection before any byte of the call was sent."""


@dataclass(slots=True)
class Call:
    """One data-plane call on its way to a replica."""

    request: CallRequest
    pool: EndpointPool
    path: str
    request_id: str
    reply: Replier
    body_sent: bool = False
    body_too_large: bool = False
    body_failed: bool = False  # the client's body could not be read (malformed, or it left)
    # Set by the OpenAI routes, which read the (bounded) JSON body to route it: sent as is.
    body: bytes | None = None
    # The client's body, whole already (the fast path's): framed as the client framed it.
    whole: bytes | None = None
    # The multipart OpenAI routes read only the body's first bytes (`replaces` of them, maybe
    # rewritten into `prefix`): those go first, the rest streams from the client.
    prefix: bytes | None = None
    replaces: int = 0
    # Applied to a whole (small) answer before it goes back, e.g. the model name rewritten.
    rewrite: Callable[[bytes], bytes] | None = None
    # Usage accounting reads the answer's OpenAI usage object as it passes: `tokens`, what it
    # said. (A UsageMeter only for a streamed answer: a whole one is read at once.)
    metered: bool = False
    tokens: tuple[int, int] | None = None
    # An OpenAI call: a broken stream ends with `data: {"error": ...}` and `data: [DONE]`.
    openai: bool = False
    # Awaited when the call gets its slot, before anything goes to the replica.
    on_lease: Callable[[], Awaitable[None]] | None = None
    # A 200 event stream already sent to the client (keep-alive while it waited): the
    # replica's answer goes into it. failed_status then says how the call really ended.
    committed: Answer | None = None
    failed_status: int | None = None
    # The answer once its head went out (a failure after that can only end the stream).
    response: Answer | None = None
    started: float = 0.0  # time.monotonic() when it came
    principal: str = "public"  # whom its usage counts for (Auth.principal)
    model: str | None = None  # the model it asked for (None: the endpoint's first)


@dataclass(slots=True)
class Sent:
    """Where the fast path handed a call on (resume_call): the replica connection it went
    out on and its answer's head to come (both None: no connection was idle, nothing sent),
    and the call's deadline, on the event loop's clock."""

    conn: UpstreamConnection | None
    answer: Awaitable[UpstreamResponse] | None
    at: float


def _cut_aiohttps(response: web.StreamResponse) -> None:
    response.force_close()
    request = response._req  # (aiohttp keeps no other way to its connection on an answer)
    transport = request.transport if request is not None else None
    if transport is not None:  # closed first: aiohttp's own end of body finds it closing
        transport.close()


class CuttableResponse(web.StreamResponse):
    """aiohttp's streamed answer, with `cut` (http_types.Answer)."""

    def cut(self) -> None:
        _cut_aiohttps(self)


class WholeResponse(web.Response):
    """aiohttp's whole answer, with `cut` (http_types.Answer)."""

    def cut(self) -> None:
        _cut_aiohttps(self)


class AiohttpReplier:
    """Answers made as aiohttp's response objects, for requests aiohttp serves."""

    __slots__ = ("request",)

    def __init__(self, request: web.Request) -> None:
        self.request = request

    def whole(self, status: int, reason: str, headers: Headers, body: bytes) -> Answer:
        return WholeResponse(status=status, reason=reason, body=body, headers=_text(headers))

    async def start(self, status: int, reason: str, headers: Headers,
                    length: int | None) -> Answer:
        response = CuttableResponse(status=status, reason=reason, headers=_text(headers))
        if length is not None:
            response.content_length = length
        await response.prepare(self.request)
        return response


def check_token(auth: Auth, request: CallRequest, spec: EndpointSpec) -> None:
    auth.require_endpoint(request, spec.name, spec.public)


def _text(headers: Headers) -> CIMultiDict[str]:
    """Header lines for aiohttp, which encodes str as UTF-8: UTF-8 lines go out as they came
    (berth's own X-Request-Id among them); others, as latin-1 text, as they always did."""
    return CIMultiDict((_as_text(name), _as_text(value)) for name, value in headers)


def _as_text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def end_to_end(fields: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes]) -> Headers:
    """The header lines that belong to the call, in order: less the hop-by-hop ones, those
    the message's Connection header names, and `drop` (lower-case names)."""
    kept: Headers = []
    named: set[bytes] = set()  # what the Connection header lines name, beyond hop-by-hop
    for name, value in fields:  # one pass, one lower() a line: every call does this twice
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in drop:
            if lower == b"connection":  # mostly "keep-alive" or "close": nothing more to drop
                for token in value.lower().split(b","):
                    if (token := token.strip()) not in HOP_BY_HOP and token != b"close":
                        named.add(token)
        else:
            kept.append((name, value))
    if named:
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept


def forwarded_headers(request: CallRequest) -> Headers:
    """What berth tells the model about the caller: never what the caller claims itself."""
    return [(b"X-Forwarded-For", (request.remote or "").encode()),
            (b"X-Forwarded-Proto", request.scheme.encode()),
            (b"X-Forwarded-Host", request.host.encode("utf-8", "surrogateescape"))]


def raw_tail(request: CallRequest) -> str:
    """The path after /invoke/{name}/ (or /async/{name}/) as the client encoded it, so that
    %3F or %2F reach the model as sent instead of turning into a query or a separator."""
    parts = request.rel_url.raw_path.split("/", 3)
    return parts[3] if len(parts) > 3 else ""


async def invoke(request: web.Request) -> web.StreamResponse:
    return cast(web.StreamResponse, await invoke_call(request, AiohttpReplier(request)))


async def invoke_call(request: CallRequest, reply: Replier) -> Answer:
    """`ANY /invoke/{name}/{path}` on a request from aiohttp or from berth's own front."""
    plane = request.app[DATA_PLANE]
    call = open_call(plane, request, reply)
    return await accounted(plane, call, _checked(plane, call,
                                                 request.headers.get("X-Berth-Replica")))


def open_call(plane: DataPlane, request: CallRequest, reply: Replier) -> Call:
    """The call a request makes (405 for a method never proxied, 404 for no endpoint)."""
    if request.method not in METHODS:  # TRACE and friends never reach a model
        raise ApiError(405, "method_not_allowed", f"{request.method} is not proxied",
                       headers={"Allow": ", ".join(sorted(METHODS))})
    pool = plane.router.pool(request.match_info["name"])
    call = Call(request, pool, raw_tail(request),
                request.headers.get("X-Request-Id") or plane.request_ids.next(), reply,
                started=time.monotonic(), principal=plane.auth.principal(presented_key(request)))
    # An OpenAI-style route, as the model server will read the path (decoded: %76%31 is v1).
    if plane.usage.enabled and request.match_info.get("path", "").startswith("v1/"):
        call.metered = True
    return call


def check_call(plane: DataPlane, call: Call) -> None:
    """What refuses a call before it takes a slot: its token, its limits, its body's size."""
    request = call.request
    check_token(plane.auth, request, call.pool.spec)
    admit(plane, call.principal, call.started)
    limit = plane.limits.max_body
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large",
                       f"request body of {request.content_length} bytes is over the "
                       f"limit of {limit} (daemon.max_body_bytes)")


async def _checked(plane: DataPlane, call: Call, pinned: str | None) -> Answer:
    check_call(plane, call)
    if call.metered and plane.auth.daily_budget(call.principal) is not None:
        await _budgeted_body(plane, call)
    return await serve_call(plane.router, call, pinned)


async def _budgeted_body(plane: DataPlane, call: Call) -> None:
    """The body of a call on an OpenAI path by a token with a daily budget, read whole
    (bounded, in time) so that a streamed call asks for its usage: without it the model may
    send none, and the budget would count nothing (the OpenAI routes do the same)."""
    request = call.request
    if request.method != "POST" or not request.body_exists:
        return
    call.body = usage_asked(await within_body_time(request, _whole_body(request,
                                                                       plane.limits.max_body)))


async def _whole_body(request: CallRequest, limit: int) -> bytes:
    raw = bytearray()
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            raw += chunk
            if len(raw) > limit:
                raise ApiError(413, "payload_too_large", "request body is over the limit "
                               f"of {limit} bytes (daemon.max_body_bytes)")
    except (ConnectionResetError, BadHttpMessage):  # (the front's, and aiohttp's)
        raise ApiError(400, "bad_request", "the request body could not be read whole "
                       "(malformed, or the client stopped sending it)") from None
    return bytes(raw)


async def within_body_time(request: CallRequest, read: Awaitable[T]) -> T:
    """`read` of a body that must come within daemon.body_timeout_s (408): a body read whole
    before the call is routed runs under no call deadline yet, and a client sending it
    slowly, or never, would hold its connection and what it sent for ever."""
    plane = request.app[DATA_PLANE]
    try:
        with CallDeadline(plane.deadlines, plane.limits.body_timeout_s):
            return await read
    except TimeoutError:
        raise ApiError(408, "request_timeout", "the request body did not arrive within "
                       f"daemon.body_timeout_s={plane.limits.body_timeout_s:g}") from None


async def accounted(plane: DataPlane, call: Call, work: Awaitable[Answer]) -> Answer:
    """The call's answer from `work`, its outcome counted (metrics, usage) however it ends."""
    outcome = 499  # the client left (the handler was cancelled), unless set below
    try:
        response = await work
        outcome = response.status
        return response
    except (ApiError, SchedulerError) as exc:
        outcome = as_api_error(exc).status
        raise
    except Exception:
        outcome = 500
        raise
    finally:
        end_call(plane, call, outcome)


def end_call(plane: DataPlane, call: Call, outcome: int) -> None:
    spec = call.pool.spec
    plane.metrics.call_ended(spec.name, outcome, time.monotonic() - call.started)
    if plane.usage.enabled:
        plane.usage.count(call.principal, spec.name, call.model or spec.first_model, outcome,
                          call.tokens)


def admit(plane: DataPlane, principal: str, tick: float) -> None:
    """429 when the caller's token is over its requests_per_minute or tokens_per_day (`tick`:
    the monotonic clock now). Most callers have no limits (public, admin, open mode)."""
    limits = plane.auth.limits.get(principal)
    if limits is not None:
        plane.quota.admit(principal, limits, time.time(), tick)


async def serve_call(router: Router, call: Call, pinned: str | None,
                     refused: list[str] | None = None) -> Answer:
    """Run the call on a replica; a refused connection is retried once on another one (not
    on those `refused` already). The slot is held for the whole exchange, streamed answer
    included, and released on exit."""
    refused = refused or []
    while len(refused) < (1 if pinned else 2):
        async with router.acquire(call.pool, pinned, frozenset(refused)) as lease:
            if call.on_lease is not None:
                await call.on_lease()
            try:
                return await _exchange(call, lease.replica)
            except ReplicaRefused:
                router.refused(lease.replica)
                refused.append(lease.replica.id)
    raise ApiError(502, "replica_unreachable", f"{' and '.join(refused)} refused the "
                   "connection")


async def resume_call(plane: DataPlane, call: Call, lease: Lease, sent: Sent) -> Answer:
    """The rest of a call that the fast path (daemon/fast_call.py) began in the connection's
    callbacks and could not end there, from where it stands, by the code every call runs
    (its outcome counted)."""
    return await accounted(plane, call, _resumed(plane, call, lease, sent))


async def _resumed(plane: DataPlane, call: Call, lease: Lease, sent: Sent) -> Answer:
    try:
        async with lease:
            return await _exchange(call, lease.replica, sent)
    except ReplicaRefused:
        plane.router.refused(lease.replica)
        return await serve_call(plane.router, call, None, [lease.replica.id])


async def _body(call: Call) -> AsyncIterator[bytes]:
    """The request body as it arrives, cut off past the size limit."""
    call.body_sent = True
    limit, total = call.request.app[LIMITS].max_body, call.replaces
    if call.prefix:
        yield call.prefix
    chunks = aiter(call.request.content.iter_chunked(CHUNK))
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except ConnectionResetError:
            call.body_failed = True  # the client's doing, not the replica's
            raise
        total += len(chunk)
        if total > limit:
            call.body_too_large = True
            raise ApiError(413, "payload_too_large", f"request body is over the limit of "
                           f"{limit} bytes (daemon.max_body_bytes)")
        yield chunk


def upstream_request(call: Call, replica: Replica
                     ) -> tuple[bytes, AsyncIterator[bytes] | bytes | None, bool]:
    """The request head as it goes to `replica` (one buffer), its body, and whether the body
    goes chunk-framed (a client body of unknown length)."""
    request = call.request
    query = request.rel_url.raw_query_string
    target = f"/{call.path}?{query}" if query else f"/{call.path}"
    fields = end_to_end(request.raw_headers, OPENAI_ONLY if call.openai else REQUEST_ONLY)
    fields += forwarded_headers(request)
    fields.append((b"X-Request-Id", call.request_id.encode("utf-8", "surrogateescape")))
    # aiohttp decoded the client's bytes as UTF-8 with surrogateescape: the same back.
    lines = [f"{request.method} {target} HTTP/1.1\r\nHost: {replica.address}\r\n".encode(
        "utf-8", "surrogateescape")]
    lines += [b"%s: %s\r\n" % line for line in fields]
    body: AsyncIterator[bytes] | bytes | None = None
    chunked = False
    if call.body is not None:  # held whole: a refused connection may still be retried
        lines.append(b"Content-Length: %d\r\n\r\n" % len(call.body))
        body = call.body
    elif call.whole is not None:  # (held too)
        if request.content_length is not None:
            lines.append(b"Content-Length: %d\r\n\r\n" % len(call.whole))
            body = call.whole
        else:
            lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(call.whole), call.whole) if call.whole \
                else b"0\r\n\r\n"
    elif request.content_length is not None:
        length = request.content_length - call.replaces + len(call.prefix or b"")
        lines.append(b"Content-Length: %d\r\n\r\n" % length)
        body = _body(call) if length else None
    elif request.body_exists:
        lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
        body, chunked = _body(call), True
    else:
        lines.append(b"\r\n")
    return b"".join(lines), body, chunked


async def _exchange(call: Call, replica: Replica, sent: Sent | None = None) -> Answer:
    """Send the call to one replica and stream its answer back, under request_timeout_s
    (or go on from where the fast path left it: `sent`)."""
    request, spec = call.request, call.pool.spec
    plane = request.app[DATA_PLANE]
    pool = plane.upstream
    seconds = spec.request_timeout_s if sent is None else sent.at - pool.loop.time()
    try:
        with CallDeadline(plane.deadlines, seconds):
            conn, answer = (sent.conn, sent.answer) if sent is not None else (None, None)
            if conn is None:
                if replica.address is None:  # not started: the router never gives one out
                    raise UpstreamRefused(f"replica {replica.id} has no address yet")
                conn = pool.idle(replica.address) or await pool.connect(replica.address)
            try:
                if answer is None:
                    head, body, chunked = upstream_request(call, replica)
                    answer = conn.send(head, body, chunked=chunked,
                                       head_only=request.method == "HEAD")
                upstream = await answer
                if call.committed is None and upstream.complete and small(upstream):
                    # the most common answer: whole already, sent with no await
                    return whole_answer(call, replica, upstream, upstream.body())
                return await _answer(call, replica, upstream)
            finally:
                pool.keep_or_close(conn)  # kept for the next call only if this one ended cleanly
    except UpstreamRefused as exc:  # no byte of the call was sent
        raise ReplicaRefused(str(exc)) from exc
    except UpstreamUnanswered as exc:
        if request.method in SAFE_METHODS and not call.body_sent:  # nothing done: go elsewhere
            raise ReplicaRefused(str(exc)) from exc
        return await _cut(call, replica, call.response, 502, "replica_failed",
                          f"replica {replica.id} failed mid-call: {exc}")
    except TimeoutError:
        message = f"call exceeded request_timeout_s={spec.request_timeout_s:g}"
        return await _cut(call, replica, call.response, 504, "timeout", message)
    except (UpstreamError, ConnectionResetError) as exc:
        if call.body_too_large:
            limit = request.app[LIMITS].max_body
            raise ApiError(413, "payload_too_large", "request body is over the limit of "
                           f"{limit} bytes (daemon.max_body_bytes)") from None
        if call.body_failed and call.response is None:
            raise ApiError(400, "bad_request", "the request body could not be read whole "
                           "(malformed, or the client stopped sending it)") from None
        return await _cut(call, replica, call.response, 502, "replica_failed",
                          f"replica {replica.id} failed mid-call: {exc}")


async def _answer(call: Call, replica: Replica, upstream: UpstreamResponse) -> Answer:
    """The replica's answer to the client: into a stream already begun, whole when small
    (one write, the common JSON answer), else streamed as it comes."""
    if call.committed is not None:
        call.response = call.committed
        await _into_committed(call, upstream, call.committed)
        return call.committed
    if small(upstream):
        return whole_answer(call, replica, upstream, await upstream.read())
    response = call.response = await _start_response(call, replica, upstream)
    await _relay(call, upstream, response)
    return response


async def _relay(call: Call, upstream: UpstreamResponse,
                 response: Answer) -> None:
    """Stream the answer's body as it comes; the meter reads each chunk after it is sent."""
    is_sse = upstream.content_type == "text/event-stream"
    sse = SseRewriter(call.rewrite) if call.rewrite is not None and is_sse else None
    meter = UsageMeter() if call.metered else None
    if meter is not None:
        meter.sse = is_sse
    try:
        await _relayed(upstream, response, sse, meter)
    finally:
        if meter is not None:  # (what it read, if the client left)
            call.tokens = meter.tokens
    await response.write_eof()


async def _relayed(upstream: UpstreamResponse, response: Answer, sse: SseRewriter | None,
                   meter: UsageMeter | None) -> None:
    writer = cast(WritesNow | None, getattr(response, "write_now", None) and response)
    if writer is not None:
        write_now = writer.write_now

        def sink(chunk: bytes) -> asyncio.Future[None] | None:
            out = sse.feed(chunk) if sse is not None else chunk
            full = write_now(out) if out else None
            if meter is not None:
                meter.feed(chunk)
            return full
        await upstream.relay(sink)
    else:
        async for chunk in upstream.chunks():
            out = sse.feed(chunk) if sse is not None else chunk
            if out:
                await response.write(out)
            if meter is not None:
                meter.feed(chunk)
    if sse is not None and (rest := sse.flush()):
        await response.write(rest)
    if meter is not None:
        meter.end()


async def _into_committed(call: Call, upstream: UpstreamResponse,
                          response: Answer) -> None:
    """The replica's answer into a stream already sent as 200: its events as they come, or
    what else it answered as one OpenAI error event."""
    if upstream.status == 200 and upstream.content_type == "text/event-stream":
        await _relay(call, upstream, response)
        return
    body = b""
    async for chunk in upstream.chunks():
        body += chunk
        if len(body) >= SMALL_BODY:
            break
    call.failed_status = upstream.status if upstream.status >= 400 else 502
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError, RecursionError):
        error = error_object(502, "upstream_error", f"the model answered {upstream.status}: "
                             f"{body[:500].decode(errors='replace')}")
    await end_stream(response, error)


async def end_stream(response: Answer, error: object) -> None:
    """End an OpenAI event stream with an error chunk and [DONE]; the client may be gone."""
    event = json.dumps({"error": error}).encode()
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write(b"data: " + event + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()


def small(upstream: UpstreamResponse) -> bool:
    length = upstream.content_length
    return length is not None and length <= SMALL_BODY and \
        upstream.content_type != "text/event-stream" and upstream.status not in NO_BODY and \
        not upstream.head_only


def _response_headers(call: Call, replica: Replica, upstream: UpstreamResponse) -> Headers:
    """The replica's header lines less hop-by-hop ones (and any it named in Connection), and
    berth's own (X-Berth-Replica; X-Request-Id, the replica's own replaced)."""
    headers = end_to_end(upstream.fields, ANSWER_OWN)
    headers += ((b"X-Berth-Replica", replica.id.encode()),
                (b"X-Request-Id", call.request_id.encode("utf-8", "surrogateescape")))
    return headers


def whole_answer(call: Call, replica: Replica, upstream: UpstreamResponse,
                 body: bytes) -> Answer:
    """A small answer read whole, in one write."""
    if call.metered:
        call.tokens = usage_in_json(body)
    if call.rewrite is not None:
        body = call.rewrite(body)
    return call.reply.whole(upstream.status, upstream.reason, _response_headers(
        call, replica, upstream), body)


async def _start_response(call: Call, replica: Replica, upstream: UpstreamResponse) -> Answer:
    length = upstream.content_length
    if call.rewrite is not None and upstream.content_type == "text/event-stream":
        length = None  # a rewritten stream changes it
    return await call.reply.start(upstream.status, upstream.reason, _response_headers(
        call, replica, upstream), length)


async def _cut(call: Call, replica: Replica, response: Answer | None,
               status: int, code: str, message: str) -> Answer:
    """End a call that failed: a JSON error if nothing was sent, else end the stream."""
    log.warning("call.cut", endpoint=call.pool.name, replica=replica.id,
                request_id=call.request_id, code=code, reason=message)
    if response is None:
        raise ApiError(status, code, message)
    if call.committed is not None:
        call.failed_status = status
    # First: the connection is not reused, and a client whose buffer is full is dropped
    # rather than waited for by the last words below (it would hold the slot for ever).
    response.force_close()
    if call.openai and response.content_type == "text/event-stream":
        await end_stream(response, error_object(status, code, message))
        return response
    if response.content_type != "text/event-stream":
        response.cut()  # its end must not read as whole (a chunked one would)
        return response
    event = json.dumps({"error": {"code": code, "message": message}})
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write(f"event: error\ndata: {event}\n\n".encode())
        await response.write_eof()
    return response


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the replica client lives as long as the app."""
    app[UPSTREAM] = UpstreamPool()
    app[REQUEST_IDS] = RequestIds()
    app[DATA_PLANE] = DataPlane(app[ROUTER], app[AUTH], app[QUOTA], app[LIMITS], app[UPSTREAM],
                                app[METRICS], app[USAGE], app[REQUEST_IDS],
                                Deadlines(app[UPSTREAM].loop), CallPacer(app[UPSTREAM].loop))
    yield
    app[UPSTREAM].close()


def add_data_plane(app: web.Application) -> None:
    app.cleanup_ctx.append(upstream_ctx)
    app.router.add_route("*", "/invoke/{name}", invoke)
    app.router.add_route("*", "/invoke/{name}/{path:.*}", invoke)
