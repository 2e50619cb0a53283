"""Async calls over HTTP: submit (`POST /async/...`), poll, fetch the result, cancel, list."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from daemon.control import query_limit
from daemon.errors import ApiError
from daemon.keys import AUTH, ROUTER
from daemon.proxy import REQUEST_ONLY, capacity_error, check_token, forward_headers
from scheduler.callbacks import describe_task
from scheduler.dispatch import Dispatcher, Spool, TaskFinished
from scheduler.router import CapacityError
from store import TaskRecord

DISPATCHER = web.AppKey("dispatcher", Dispatcher)
MAX_ASYNC_BODY = web.AppKey("max_async_body", int)
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
KEPT_OUT = REQUEST_ONLY | {"x-callback-url"}


def callback_url(request: web.Request) -> str | None:
    url = request.headers.get("X-Callback-Url")
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ApiError(422, "invalid_callback_url",
                       f"X-Callback-Url must be an http or https URL, got {url!r}")
    return url


async def read_body(request: web.Request, task_id: str,
                    files: Path) -> tuple[bytes | None, str | None]:
    """The body inline (up to 64 KiB) or spilled to a file as it arrives; 413 leaves nothing."""
    limit = request.app[MAX_ASYNC_BODY]
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
    except BaseException:
        spool.discard()
        raise
    body, name = spool.close()
    return (body if request.body_exists else None), name


async def submit(request: web.Request) -> web.Response:
    router, dispatcher = request.app[ROUTER], request.app[DISPATCHER]
    try:
        pool = router.pool(request.match_info["name"])
    except CapacityError as exc:
        raise capacity_error(exc) from None
    check_token(request, pool)
    url = callback_url(request)
    task_id = secrets.token_hex(16)  # 128 random bits: unguessable, and never starts with "-"
    body, body_file = await read_body(request, task_id, dispatcher.files)
    task = TaskRecord(
        id=task_id, endpoint=pool.name, method=request.method,
        path=request.match_info.get("path", ""), query=request.query_string,
        headers=list(forward_headers(request.headers, KEPT_OUT).items()),
        created_at=time.time(), body=body, body_file=body_file, callback_url=url,
        callback_state="pending" if url else None)
    await dispatcher.store.tasks.add(task)  # committed before the 202: durable from here
    dispatcher.submit(task)
    return web.json_response(describe_task(task), status=202,
                             headers={"Location": f"/tasks/{task_id}"})


async def _task(request: web.Request) -> TaskRecord:
    task_id = request.match_info["id"]
    task = await request.app[DISPATCHER].store.tasks.get(task_id)
    if task is None:
        raise ApiError(404, "task_not_found", f"no task {task_id!r}")
    pool = request.app[ROUTER].reconciler.pools.get(task.endpoint)
    if pool is not None:
        check_token(request, pool)
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
        raise ApiError(422, "invalid", f"status must be one of {', '.join(STATUSES)}")
    tasks = await request.app[DISPATCHER].store.tasks.find(
        request.query.get("endpoint"), status, query_limit(request))
    return web.json_response({"tasks": [describe_task(t) for t in tasks]})


def add_async_plane(app: web.Application, dispatcher: Dispatcher, max_body: int) -> None:
    app[DISPATCHER] = dispatcher
    app[MAX_ASYNC_BODY] = max_body
    app.router.add_post("/async/{name}", submit)
    app.router.add_post("/async/{name}/{path:.*}", submit)
    app.router.add_get("/tasks/{id}", get_task)
    app.router.add_get("/tasks/{id}/result", get_result)
    app.router.add_delete("/tasks/{id}", cancel_task)
    app.router.add_get("/v1/tasks", list_tasks)
