"""The OpenAI-compatible front door: `POST /v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`, `/v1/rerank`, `/v1/responses`, `/v1/moderations`, `/v1/images/generations`
and `/v1/audio/speech` (JSON), `/v1/audio/transcriptions` and `/v1/audio/translations`
(multipart), routed by the `model` field to the endpoint that lists it.

A call takes the same path as `/invoke` (slot lease, queue, 429, scale from zero, timeouts,
X-Berth-Replica, metrics, usage): only routing differs. A JSON body is read whole (up to
daemon.max_body_bytes) to find `model`; a form only up to its `model` field, the rest
streams. With `upstream_model` set, berth rewrites `model` to it on the way in and back to
the client's name in the answer. Errors use OpenAI's shape (`message`, `type`, `param`,
`code`, berth's codes kept) so SDKs raise their typed exceptions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from aiohttp import web

from berth.daemon.errors import ApiError, as_api_error
from berth.daemon.http_types import JSON_TYPE, Answer, CallRequest, Replier, as_lines
from berth.daemon.json_values import request_json
from berth.daemon.keys import DATA_PLANE, LIMITS, DataPlane
from berth.daemon.models_api import ERROR_TYPES, presented_key
from berth.daemon.openai_form import FormError, Found, read_model_field
from berth.daemon.proxy import AiohttpReplier, Call, admit, serve_call, within_body_time
from berth.daemon.stream_wait import serve_streaming
from berth.daemon.usage import ask_usage, asks_to_stream
from berth.scheduler.errors import SchedulerError
from berth.scheduler.pool import EndpointPool

JSON_ROUTES = ("chat/completions", "completions", "embeddings", "rerank", "responses",
               "moderations", "images/generations", "audio/speech")
FORM_ROUTES = ("audio/transcriptions", "audio/translations")
R = TypeVar("R", bound=CallRequest)  # aiohttp's request, or the front's (JSON routes)


class OpenAIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.param, self.headers = param, headers or {}

    def answer(self, reply: Replier) -> Answer:
        error = {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                 "param": self.param, "code": self.code}
        headers = [JSON_TYPE, *as_lines(self.headers)]
        return reply.whole(self.status, "", headers, json.dumps({"error": error}).encode())


async def read_json(request: CallRequest) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object (and its bytes), read only up to daemon.max_body_bytes."""
    limit = request.app[LIMITS].max_body
    if request.content_length is not None and request.content_length > limit:
        raise OpenAIError(413, "payload_too_large", f"request body of "
                          f"{request.content_length} bytes is over the limit of {limit}")
    raw = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        raw += chunk
        if len(raw) > limit:
            raise OpenAIError(413, "payload_too_large", f"request body is over the limit of "
                              f"{limit} bytes")
    try:
        body = request_json(raw)
    except (ValueError, RecursionError):
        raise OpenAIError(400, "bad_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "bad_json", "the request body must be a JSON object")
    return body, bytes(raw)


@dataclass
class Asked:
    """What an OpenAI call asks for, from as much of its body as routing needs: `head` is
    the whole body (JSON) or its first bytes (a form, `span` where its model value is)."""

    model: Any
    stream: bool
    head: bytes
    json_body: dict[str, Any] | None = None
    span: Found | None = None
    changed: bool = False  # json_body differs from head

    def ask_usage(self) -> None:
        """Have a streamed answer end with its usage (a token with a daily budget must be
        counted even when its client did not ask for the usage chunk)."""
        if self.json_body is not None and ask_usage(self.json_body):
            self.changed = True

    def into(self, call: Call, upstream: str | None) -> None:
        """Give the call its body, with the model renamed to `upstream` when set."""
        if self.json_body is not None:
            call.body = self.head if not (upstream or self.changed) else with_model(
                self.json_body, upstream or self.json_body.get("model"))
            return
        call.prefix, call.replaces = self.head, len(self.head)
        if upstream and self.span is not None:
            call.prefix = self.head[:self.span.start] + upstream.encode() + \
                self.head[self.span.end:]


def with_model(body: dict[str, Any], model: Any) -> bytes:
    """A JSON body sent with its `model` replaced (the endpoint's upstream_model)."""
    return json.dumps({**body, "model": model}).encode()


async def asked_json(request: CallRequest) -> Asked:
    body = getattr(request, "json_body", None)  # (the front's fast path parsed it whole)
    if body is not None:  # (its body is whole: taken, so that its hold goes)
        raw = request.content.whole()  # type: ignore[attr-defined]
    else:
        body, raw = await read_json(request)
    return Asked(body.get("model"), asks_to_stream(body), raw, json_body=body)


async def asked_form(request: web.Request) -> Asked:
    limit = request.app[LIMITS].max_body
    if request.content_length is not None and request.content_length > limit:
        raise OpenAIError(413, "payload_too_large", f"request body of "
                          f"{request.content_length} bytes is over the limit of {limit}")
    try:
        model, head, span = await read_model_field(request)
    except FormError as exc:
        raise OpenAIError(400, "missing_model" if "`model`" in str(exc) else "bad_form",
                          str(exc), "model") from None
    if len(head) > limit:  # the rest is counted as it streams; this part is read already
        raise OpenAIError(413, "payload_too_large", f"request body is over the limit of "
                          f"{limit} bytes")
    return Asked(model, False, head, span=span)


def model_pool(plane: DataPlane, model: Any) -> tuple[str, EndpointPool]:
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "missing_model", "`model` (a string) is required", "model")
    pool = plane.router.reconciler.serving(model)
    if pool is not None:
        return model, pool
    raise OpenAIError(404, "model_not_found", f"The model {model!r} does not exist or you "
                      "do not have access to it.", "model")


def check_any_key(plane: DataPlane, key: str | None) -> None:
    """401 before the body is read, when no model could be called without a known key: an
    anonymous caller must not make berth read and parse a large body. (`key`: the
    request's presented_key, read once per call.)"""
    auth = plane.auth
    if auth.open or (key is not None and auth.knows(key)):
        return
    if not any(p.spec.public for p in plane.router.reconciler.live_pools()):
        raise OpenAIError(401, "unauthorized", "missing, unknown or revoked API key")


def check_key(plane: DataPlane, pool: EndpointPool, key: str | None) -> None:
    auth = plane.auth
    if auth.allows(key, pool.name, pool.spec.public):
        return
    if key is None or not auth.knows(key):
        raise OpenAIError(401, "unauthorized", "missing, unknown or revoked API key")
    raise OpenAIError(403, "forbidden", f"this key may not call endpoint {pool.name}")


def renamer(asked: str, upstream: str) -> Callable[[bytes], bytes]:
    """Put the client's model name back into a JSON answer that carries the upstream one."""
    def rewrite(body: bytes) -> bytes:
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):  # (the replica's bytes: anything, nested at will)
            return body
        if isinstance(answer, dict) and answer.get("model") == upstream:
            answer["model"] = asked
            return json.dumps(answer).encode()
        return body
    return rewrite


def fast_call(plane: DataPlane, request: CallRequest, reply: Replier, raw: bytes,
              body: dict[str, Any], key: str | None) -> Call | None:
    """The call that a JSON request whose body `raw` (parsed: `body`; its presented key:
    `key`) came whole makes on the fast path (daemon/fast_call.py); None when it is anything
    but a plain one: no known model, a key that may not call it, a caller with limits, a
    streamed answer (whose wait for a slot keeps its stream alive). Those go serve_openai's
    way, which says why."""
    if asks_to_stream(body):
        return None
    try:
        model, pool = model_pool(plane, body.get("model"))
        check_key(plane, pool, key)
    except OpenAIError:
        return None
    principal = plane.auth.principal(key)
    if plane.auth.limits.get(principal) is not None:
        return None  # (admit counts each call: serve_openai's way counts it)
    call = routed_call(plane, request, reply, pool, model, principal)
    upstream = pool.spec.upstream_model  # (its body as it came: no Asked made and read)
    call.body = with_model(body, upstream) if upstream else raw
    return call


def routed_call(plane: DataPlane, request: CallRequest, reply: Replier, pool: EndpointPool,
                model: str, principal: str) -> Call:
    """The call an OpenAI request routed to `pool` makes (either way: fast or a task's), its
    answer's model renamed back when the endpoint has an upstream_model; the caller gives
    it its body."""
    call = Call(request, pool, request.rel_url.raw_path.lstrip("/"),
                request.headers.get("X-Request-Id") or plane.request_ids.next(), reply,
                openai=True, metered=plane.usage.enabled,
                started=time.monotonic(), principal=principal, model=model)
    upstream = pool.spec.upstream_model
    if upstream:
        call.rewrite = renamer(model, upstream)
    return call


async def openai_call(request: web.Request) -> web.StreamResponse:
    return cast(web.StreamResponse, await serve_openai(request, asked_json,
                                                       AiohttpReplier(request)))


async def openai_form_call(request: web.Request) -> web.StreamResponse:
    return cast(web.StreamResponse, await serve_openai(request, asked_form,
                                                       AiohttpReplier(request)))


async def serve_openai(request: R, read: Callable[[R], Awaitable[Asked]],
                       reply: Replier) -> Answer:
    """An OpenAI call from aiohttp (any route) or from berth's own front (the JSON ones)."""
    started, outcome, call, routed = time.monotonic(), 499, None, None
    plane = request.app[DATA_PLANE]
    try:
        key = presented_key(request)
        check_any_key(plane, key)
        asked = await within_body_time(request, read(request))  # (its model is inside)
        model, pool = model_pool(plane, asked.model)
        principal = plane.auth.principal(key)
        routed = (principal, pool.name, model)
        check_key(plane, pool, key)
        admit(plane, principal, time.monotonic())
        if asked.stream and plane.auth.daily_budget(principal) is not None:
            asked.ask_usage()
        call = routed_call(plane, request, reply, pool, model, principal)
        asked.into(call, pool.spec.upstream_model)
        every = pool.spec.stream_keepalive_s
        if asked.stream and every > 0:
            response = await serve_streaming(plane.router, call, every)
        else:
            response = await serve_call(plane.router, call, None)
        outcome = call.failed_status or response.status
        return response
    except OpenAIError as exc:
        outcome = exc.status
        return exc.answer(reply)
    except (ApiError, SchedulerError) as exc:
        error = as_api_error(exc)
        outcome = error.status
        return OpenAIError(error.status, error.code, error.message,
                           headers=error.headers).answer(reply)
    finally:
        if routed is not None:
            plane.metrics.call_ended(routed[1], outcome, time.monotonic() - started)
            plane.usage.count(*routed, outcome, call.tokens if call is not None else None)


def add_openai_api(app: web.Application) -> None:
    for path in JSON_ROUTES:
        app.router.add_post(f"/v1/{path}", openai_call)
    for path in FORM_ROUTES:
        app.router.add_post(f"/v1/{path}", openai_form_call)
