"""The aiohttp application: control API, data plane, async calls, with one error shape."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

from berth.daemon.audit import action_of, audited
from berth.daemon.auth import Auth, add_admin_route, admin_auth
from berth.daemon.browser import BrowserGuard, browser_middleware
from berth.daemon.control import add_control_api
from berth.daemon.errors import ApiError, as_api_error, error_response, storage_error
from berth.daemon.event_feed import EventFeed
from berth.daemon.gpus_api import add_gpus_api
from berth.daemon.keys import (
    ADMIN_ROUTES,
    ALLOCATOR,
    AUTH,
    BROWSER,
    EVENTS,
    GPU_READINGS,
    GPU_SAMPLES,
    IMAGES,
    LIMITS,
    METRICS,
    QUOTA,
    RECONCILER,
    ROUTER,
    RUNTIME,
    STORE,
    USAGE,
    WRITES,
    Limits,
)
from berth.daemon.metering import UsageLedger
from berth.daemon.metrics import CONTENT_TYPE_LATEST, Metrics
from berth.daemon.models_api import add_models_api
from berth.daemon.openai_api import add_openai_api
from berth.daemon.openapi import add_openapi
from berth.daemon.proxy import add_data_plane
from berth.daemon.quota import Quota
from berth.daemon.replica_logs import track_log_streams
from berth.daemon.tasks_api import add_async_plane
from berth.daemon.ui_page import add_ui
from berth.daemon.usage import flushing
from berth.gpu import GpuAllocator, GpuSample
from berth.gpu.inventory import GpuReadings
from berth.scheduler.dispatch import Dispatcher
from berth.scheduler.errors import SchedulerError
from berth.scheduler.reconciler import Reconciler
from berth.scheduler.router import Router

log = structlog.get_logger("berth.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
          415: "unsupported_media_type", 421: "misdirected_request", 422: "invalid",
          429: "too_many_requests"}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON; nothing a client sends can produce a bare 500."""
    try:
        return await handler(request)
    except (ApiError, SchedulerError) as exc:
        error = as_api_error(exc)
        return error_response(error.status, error.code, error.message, error.headers,
                              error.details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        message = exc.reason
        if exc.status == 404:
            message = f"no route for {request.method} {request.path}"
        return error_response(exc.status, _CODES.get(exc.status, "http_error"), message, headers)
    except (sqlite3.Error, OSError) as exc:  # a full or failing disk is not the caller's fault
        log.warning("http.storage_error", method=request.method, path=request.path,
                    error=str(exc))
        error = storage_error(exc)
        return error_response(error.status, error.code, error.message, error.headers)
    except Exception:
        log.exception("http.unhandled_error", method=request.method, path=request.path)
        return error_response(500, "internal", "internal error; see the berthd log")


@web.middleware
async def complete_writes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A write (control API, task submit or cancel) runs to its end even when its client
    leaves: aiohttp cancels the handler of a closed connection, and a write cut between
    SQLite and memory would leave them disagreeing. Model calls (/invoke, the OpenAI routes)
    are left to be cancelled: that frees their slot."""
    is_write = request.match_info.route in request.app[ADMIN_ROUTES] or \
        request.path.startswith(("/async/", "/tasks/"))
    if request.method in ("GET", "HEAD", "OPTIONS") or not is_write:
        return await handler(request)
    action = action_of(request)  # control writes leave a row in the audit log
    task = asyncio.ensure_future(handler(request) if action is None
                                 else audited(request, handler, action))
    writes = request.app[WRITES]
    writes.add(task)
    task.add_done_callback(writes.discard)
    task.add_done_callback(_finished_write)
    return await asyncio.shield(task)


def _finished_write(task: asyncio.Future[web.StreamResponse]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a client that left never sees it, nor should the log


async def writes_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: writes whose clients left still finish before the app closes."""
    writes: set[asyncio.Future[web.StreamResponse]] = set()
    app[WRITES] = writes
    yield
    while writes:
        await asyncio.gather(*list(writes), return_exceptions=True)


async def usage_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: usage counts flushed to SQLite while the app runs, and once more at its
    end (after the listener's last call)."""
    async with flushing(app[USAGE], time.time()):
        yield


async def end_followers(app: web.Application) -> None:
    app[EVENTS].end_all()  # open status pages must not hold up a stop


async def healthz(request: web.Request) -> web.Response:
    """200 when berthd can do its job; 503 while the Docker engine is unreachable. A state
    disk under daemon.min_free_disk is said (async intake is refused, sync calls go on)."""
    reconciler = request.app[RECONCILER]
    runtime = request.app[RUNTIME]
    if runtime.engine_up:
        answer: dict[str, object] = {"status": "ok", "endpoints": len(reconciler.live_pools())}
        low = low_disk(request)
        if low:
            answer["state_disk"] = low
        readings = request.app[GPU_READINGS]
        if not readings.available:  # NVML is away (driver upgrade): replicas keep running
            answer["gpus"] = (f"readings unknown since {readings.since:.0f}: NVML does not "
                              f"answer ({readings.why}); replicas keep running")
        return web.json_response(answer)
    return web.json_response({"status": "degraded", "endpoints": len(reconciler.live_pools()),
                              "docker": f"unreachable since {runtime.down_since:.0f}: "
                                        f"{runtime.down_reason}"}, status=503)


def low_disk(request: web.Request) -> str | None:
    minimum = request.app[LIMITS].min_free_disk
    free = shutil.disk_usage(request.app[STORE].path.parent).free
    if free >= minimum:
        return None
    return (f"low: {free} bytes free, under daemon.min_free_disk ({minimum}); new async "
            "tasks are refused (507), sync calls go on")


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    await registry.refresh(request.app[RECONCILER], request.app[ALLOCATOR],
                           request.app[GPU_SAMPLES], request.app[USAGE].model_tokens,
                           request.app[LIMITS].min_free_disk)
    return web.Response(body=registry.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(reconciler: Reconciler, allocator: GpuAllocator, admin_token: str = "",
              gpu_samples: dict[str, GpuSample] | None = None,
              max_body_bytes: int = 100 * 1024 ** 2, dispatcher: Dispatcher | None = None,
              max_async_body_bytes: int = 1024 ** 3, auth: Auth | None = None,
              guard: BrowserGuard | None = None, min_free_disk: int = 0,
              volume_prefixes: tuple[str, ...] = (),
              usage: UsageLedger | None = None,
              gpu_readings: GpuReadings | None = None,
              body_timeout_s: float = 60.0) -> web.Application:
    """The whole HTTP surface, every shared object on its key (daemon/keys.py). Control
    bodies are small (1 MiB); call bodies stream. `guard` defaults to a loopback listener
    answering to 127.0.0.1 and localhost."""
    guard = guard or BrowserGuard.build("127.0.0.1", ["localhost"], [])
    # complete_writes before the guards: refused writes are audited too, in the same task.
    app = web.Application(middlewares=[json_errors, complete_writes, browser_middleware(guard),
                                       admin_auth], client_max_size=1024 ** 2)
    app.cleanup_ctx.append(writes_ctx)
    app.cleanup_ctx.append(usage_ctx)
    app[STORE] = reconciler.store
    app[RUNTIME] = reconciler.runtime
    app[IMAGES] = reconciler.images
    app[RECONCILER] = reconciler
    app[ALLOCATOR] = allocator
    app[ROUTER] = dispatcher.router if dispatcher else Router(reconciler)
    app[AUTH] = auth if auth is not None else Auth(admin=admin_token)
    app[BROWSER] = guard
    app[USAGE] = usage if usage is not None else UsageLedger(reconciler.store.usage)
    app[QUOTA] = Quota(app[USAGE])
    reconciler.removal_listeners.append(app[AUTH].forget_endpoint)
    app[EVENTS] = EventFeed()
    app.on_shutdown.append(end_followers)
    track_log_streams(app)
    reconciler.event_listeners.append(app[EVENTS].publish)
    app[GPU_SAMPLES] = gpu_samples if gpu_samples is not None else {}
    app[GPU_READINGS] = gpu_readings or GpuReadings()
    app[METRICS] = Metrics()
    reconciler.start_listeners.append(app[METRICS].start_observed)
    reconciler.wake_listeners.append(app[METRICS].wake_observed)
    reconciler.event_listeners.append(app[METRICS].event_observed)
    app[LIMITS] = Limits(max_body_bytes, max_async_body_bytes, min_free_disk, volume_prefixes,
                         body_timeout_s)
    app[ADMIN_ROUTES] = set()
    app.router.add_get("/healthz", healthz)
    add_admin_route(app, "GET", "/metrics", metrics)
    add_control_api(app)
    add_gpus_api(app)
    add_models_api(app)
    add_openai_api(app)
    add_data_plane(app)
    if dispatcher is not None:
        add_async_plane(app, dispatcher)
    add_openapi(app)
    add_ui(app)
    return app
