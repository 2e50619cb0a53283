"""Async calls over HTTP: submit (`POST /async/...`), poll, fetch the result, cancel, list."""

from __future__ import annotations

import asyncio
import functools
import secrets
import shutil
import sqlite3
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from aiohttp import web
from yarl import URL

from berth.daemon.auth import add_admin_route
from berth.daemon.config import EndpointSpec
from berth.daemon.errors import ApiError, storage_error
from berth.daemon.keys import (
    AUTH,
    CALLBACK_POLICY,
    DATA_PLANE,
    DISPATCHER,
    LIMITS,
    QUOTA,
    RECONCILER,
    ROUTER,
    STORE,
    USAGE,
)
from berth.daemon.metering import UsageMeter, account, hour_of
from berth.daemon.models_api import presented_key
from berth.daemon.params import bad_query, query_limit
from berth.daemon.proxy import (
    REQUEST_ONLY,
    admit,
    check_token,
    end_to_end,
    forwarded_headers,
    raw_tail,
)
from berth.daemon.usage import usage_asked
from berth.scheduler.callbacks import describe_task
from berth.scheduler.dispatch import Dispatcher, Spool, TaskFinished
from berth.scheduler.egress import CallbackRefused, PolicyUnavailable
from berth.store import TaskRecord

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
KEPT_OUT = REQUEST_ONLY | {b"x-callback-url"}
ASYNC_RETRY_AFTER_S = 5


def stored_headers(request: web.Request) -> list[tuple[str, str]]:
    """The header lines a task keeps for its replica, as text for its row (decoded as
    aiohttp decodes them, so that the dispatcher sends the bytes the client sent)."""
    return [(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in [*end_to_end(request.raw_headers, KEPT_OUT),
                                *forwarded_headers(request)]]


async def callback_url(request: web.Request) -> str | None:
    """X-Callback-Url, or None: 422 unless an http(s) URL whose host the egress policy allows
    (checked again at each delivery); 503 if the engine's networks cannot be read."""
    url = request.headers.get("X-Callback-Url")
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        host = URL(url).host  # the parser aiohttp connects with
    except ValueError:  # (e.g. "http://[::1": an unclosed IPv6 address)
        parts, host = urlsplit(""), None
    if parts.scheme not in ("http", "https") or not parts.netloc or not host:
        raise ApiError(422, "invalid_callback_url",
                       f"X-Callback-Url must be an http or https URL, got {url!r}")
    try:
        await request.app[CALLBACK_POLICY].check(host)
    except CallbackRefused as exc:
        raise ApiError(422, "callback_refused", f"X-Callback-Url refused by policy: {exc} "
                       "(daemon.callback_allow)") from None
    except PolicyUnavailable as exc:
        raise ApiError(503, "callback_policy_unavailable",
                       f"X-Callback-Url cannot be checked now: {exc}",
                       headers={"Retry-After": "5"}) from None
    return url


def check_free_space(files: Path, wanted: int, min_free: int) -> None:
    """507 when storing `wanted` more bytes would leave less than daemon.min_free_disk."""
    if min_free and shutil.disk_usage(files).free - wanted < min_free:
        raise ApiError(507, "insufficient_storage", "berth's state disk is below "
                       f"daemon.min_free_disk ({min_free} bytes free wanted); new async tasks "
                       "are refused until space is freed")


def queue_full(pool_name: str, queued: int, stored: int, size: int,
               spec: EndpointSpec) -> ApiError | None:
    """429 when one more task of `size` bytes would pass async_queue_limit or _bytes."""
    if queued >= spec.async_queue_limit:
        why = f"{queued} tasks queued (async_queue_limit {spec.async_queue_limit})"
    elif stored + size > spec.async_queue_max_bytes:
        why = (f"{stored} bytes of task bodies stored (async_queue_bytes "
               f"{spec.async_queue_bytes})")
    else:
        return None
    return ApiError(429, "async_queue_full", f"endpoint {pool_name} has {why}",
                    headers={"Retry-After": str(ASYNC_RETRY_AFTER_S)})


async def read_body(request: web.Request, task_id: str,
                    files: Path) -> tuple[bytes | None, str | None, int]:
    """The body inline (up to 64 KiB) or spilled to a file as it arrives, and its size;
    413, or a failed write, leaves nothing behind."""
    limit = request.app[LIMITS].max_async_body
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", f"request body of {request.content_length} "
                       f"bytes is over the limit of {limit} (daemon.max_async_body_bytes)")
    spool, size = Spool(files, f"{task_id}.body"), 0
    try:
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "payload_too_large", "request body is over the limit of "
                               f"{limit} bytes (daemon.max_async_body_bytes)")
            spool.write(chunk)
        body, name = spool.close()
    except BaseException as exc:
        spool.discard()
        if isinstance(exc, OSError):
            raise storage_error(exc) from None
        raise
    return (body if request.body_exists else None), name, size


async def usage_asked_in_file(path: Path) -> int:
    """usage_asked for a body spilled to a file (up to daemon.max_body_bytes, as /invoke reads
    one whole): the file rewritten if it changed, and its size."""
    def rewrite() -> int:
        try:
            raw = path.read_bytes()
            asked = usage_asked(raw)
            if asked is not raw:
                path.write_bytes(asked)
        except OSError:
            path.unlink(missing_ok=True)  # (a task never stored: nothing else refers to it)
            raise
        return len(asked)

    try:
        return await asyncio.to_thread(rewrite)
    except OSError as exc:
        raise storage_error(exc) from None


async def submit(request: web.Request) -> web.Response:
    router, dispatcher = request.app[ROUTER], request.app[DISPATCHER]
    pool = router.pool(request.match_info["name"])
    check_token(request.app[AUTH], request, pool.spec)
    principal = request.app[AUTH].principal(presented_key(request))
    admit(request.app[DATA_PLANE], principal, time.monotonic())
    url = await callback_url(request)
    spec, tasks = pool.spec, request.app[STORE].tasks
    expected = request.content_length or 0
    check_free_space(dispatcher.files, expected, request.app[LIMITS].min_free_disk)
    refusal = queue_full(pool.name, *await tasks.backlog(pool.name), expected, spec)
    if refusal is not None:  # refused before a byte of the body is stored
        raise refusal
    task_id = secrets.token_hex(16)  # 128 random bits: unguessable, and never starts with "-"
    body, body_file, size = await read_body(request, task_id, dispatcher.files)
    if request.app[AUTH].daily_budget(principal) is not None and \
            unquote(raw_tail(request)).startswith("v1/"):  # (as /invoke: the budget counts it)
        if body is not None:
            body = usage_asked(body)
            size = len(body)
        elif body_file is not None and size <= request.app[LIMITS].max_body:
            size = await usage_asked_in_file(dispatcher.file(body_file))
    task = TaskRecord(
        id=task_id, endpoint=pool.name, method=request.method,
        path=raw_tail(request), query=request.rel_url.raw_query_string,
        headers=stored_headers(request),
        created_at=time.time(), body=body, body_file=body_file, callback_url=url,
        callback_state="pending" if url else None, body_size=size, principal=principal)
    try:  # committed before the 202: durable from here
        stored = await tasks.add_within(task, spec.async_queue_limit, spec.async_queue_max_bytes)
    except sqlite3.Error as exc:
        stored = False
        refusal = storage_error(exc)
    if not stored:
        if body_file is not None:
            dispatcher.file(body_file).unlink(missing_ok=True)
        raise refusal or queue_full(pool.name, *await tasks.backlog(pool.name), size,
                                    spec) or storage_error(sqlite3.Error("not stored"))
    dispatcher.submit(task)
    return web.json_response(describe_task(task), status=202,
                             headers={"Location": f"/tasks/{task_id}"})


async def _task(request: web.Request) -> TaskRecord:
    task_id = request.match_info["id"]
    task = await request.app[STORE].tasks.get(task_id)
    if task is None:
        raise ApiError(404, "task_not_found", f"no task {task_id!r}")
    pool = request.app[RECONCILER].pool(task.endpoint)
    if pool is not None:
        check_token(request.app[AUTH], request, pool.spec)
    else:  # endpoint gone: only the admin token may look
        request.app[AUTH].require_admin(request)
    return task


async def get_task(request: web.Request) -> web.Response:
    return web.json_response(describe_task(await _task(request)))


async def get_result(request: web.Request) -> web.StreamResponse:
    task = await _task(request)
    if task.purged_at is not None:
        raise ApiError(410, "result_purged", f"task {task.id} finished more than result_ttl_s "
                       "ago; its body and result were deleted")
    if task.result_status is None:
        if task.finished:
            raise ApiError(404, "no_result", f"task {task.id} {task.status} without a result: "
                           f"{task.error}")
        raise ApiError(409, "not_finished", f"task {task.id} is {task.status}")
    headers = {"X-Berth-Task": task.id, "X-Berth-Replica": task.replica or ""}
    if task.result_type:
        headers["Content-Type"] = task.result_type
    if task.result_file is None:
        return web.Response(status=task.result_status, body=task.result_body or b"",
                            headers=headers)
    headers.setdefault("Content-Type", "application/octet-stream")
    # Streamed from disk by the server (sendfile), never read whole into memory.
    return web.FileResponse(request.app[DISPATCHER].file(task.result_file),
                            status=task.result_status, headers=headers)


async def cancel_task(request: web.Request) -> web.Response:
    task = await _task(request)
    try:
        done = await request.app[DISPATCHER].cancel(task.id)
    except TaskFinished as exc:
        raise ApiError(409, "task_finished", str(exc)) from None
    assert done is not None
    return web.json_response(describe_task(done))


async def list_tasks(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise bad_query("status", f"status must be one of {', '.join(STATUSES)}")
    tasks = await request.app[STORE].tasks.find(
        request.query.get("endpoint"), status, query_limit(request))
    return web.json_response({"tasks": [describe_task(t) for t in tasks]})


async def count_tasks(request: web.Request) -> web.Response:
    """How many tasks the store keeps, by endpoint and status."""
    counts = await request.app[STORE].tasks.counts()
    return web.json_response({"counts": [{"endpoint": e, "status": s, "count": n}
                                         for e, s, n in counts]})


OVER_BUDGET = "over its token's daily budget"


def budget_refusal(app: web.Application, task: TaskRecord) -> str | None:
    """Why a task may not start now: its token spent today's budget since it was submitted
    (a burst of tasks is admitted before any of them is counted)."""
    budget = app[AUTH].daily_budget(task.principal)
    if budget is None:
        return None
    used = app[QUOTA].ledger.tokens_today(task.principal, time.time())
    if used < budget:
        return None
    return (f"{OVER_BUDGET}: token {task.principal} used {used} of its "
            f"{budget} model tokens of today (UTC) before the task could start")


def account_task(app: web.Application, task: TaskRecord, meter: UsageMeter | None) -> None:
    """An ended task counted as a call of its principal, with the tokens its answer said
    (so a daily budget holds on /async as on /invoke)."""
    pool = app[RECONCILER].pool(task.endpoint)
    if pool is None:
        return
    error = task.error or ""
    status = task.result_status if task.status == "succeeded" and task.result_status else \
        499 if task.status == "cancelled" else 429 if error.startswith(OVER_BUDGET) else \
        504 if "async_timeout_s" in error else 502
    account(app[USAGE], (hour_of(task.finished_at or time.time()), task.principal,
                         task.endpoint, pool.spec.first_model), status, meter)


def add_async_plane(app: web.Application, dispatcher: Dispatcher) -> None:
    app[DISPATCHER] = dispatcher
    dispatcher.finished_listeners.append(functools.partial(account_task, app))
    dispatcher.start_checks.append(functools.partial(budget_refusal, app))
    app[CALLBACK_POLICY] = dispatcher.callbacks.policy  # wiring, once: handlers read the key
    app.router.add_post("/async/{name}", submit)
    app.router.add_post("/async/{name}/{path:.*}", submit)
    app.router.add_get("/tasks/{id}", get_task)
    app.router.add_get("/tasks/{id}/result", get_result)
    app.router.add_delete("/tasks/{id}", cancel_task)
    add_admin_route(app, "GET", "/v1/tasks", list_tasks)
    add_admin_route(app, "GET", "/v1/tasks/counts", count_tasks)
