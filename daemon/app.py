"""The aiohttp application: control API, data plane, async calls, with one error shape."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from daemon.auth import Auth
from daemon.control import add_control_api
from daemon.errors import ApiError, error_response
from daemon.keys import AUTH, METRICS
from daemon.metrics import CONTENT_TYPE_LATEST, Metrics
from daemon.openapi import add_openapi
from daemon.proxy import add_data_plane
from daemon.tasks_api import add_async_plane
from gpu import GpuAllocator, GpuSample
from scheduler.dispatch import Dispatcher
from scheduler.reconciler import Reconciler
from scheduler.router import Router

log = logging.getLogger("berth.api")

RECONCILER = web.AppKey("reconciler", Reconciler)
ALLOCATOR = web.AppKey("allocator", GpuAllocator)
GPU_SAMPLES = web.AppKey("gpu_samples", dict[str, GpuSample])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
          422: "invalid", 429: "too_many_requests"}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON; nothing a client sends can produce a bare 500."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers, exc.details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        message = exc.reason
        if exc.status == 404:
            message = f"no route for {request.method} {request.path}"
        return error_response(exc.status, _CODES.get(exc.status, "http_error"), message, headers)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the berthd log")


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Control API calls (/v1/...) and /metrics need the admin token, when one is configured."""
    if request.path.startswith("/v1/") or request.path == "/metrics":
        request.app[AUTH].require_admin(request)
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    pools = request.app[RECONCILER].pools
    return web.json_response({"status": "ok", "endpoints": len(pools)})


def _gpu_names(request: web.Request) -> dict[str, Any]:
    return {g.uuid: {"index": g.index, "uuid": g.uuid, "name": g.name}
            for g in request.app[ALLOCATOR].gpus}


async def list_endpoints(request: web.Request) -> web.Response:
    names = _gpu_names(request)
    pools = sorted(request.app[RECONCILER].pools.values(), key=lambda p: p.name)
    return web.json_response({"endpoints": [p.describe(names) for p in pools if not p.removed]})


async def get_endpoint(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    pool = request.app[RECONCILER].pools.get(name)
    if pool is None or pool.removed:
        raise ApiError(404, "endpoint_not_found", f"no endpoint named {name!r}")
    return web.json_response(pool.describe(_gpu_names(request)))


async def list_gpus(request: web.Request) -> web.Response:
    allocator = request.app[ALLOCATOR]
    owners = allocator.owners()
    endpoints = {r.id: p.name for p in request.app[RECONCILER].pools.values()
                 for r in p.replicas.values()}
    samples = request.app[GPU_SAMPLES]
    gpus = []
    for gpu in allocator.gpus:
        holder = owners.get(gpu.uuid)
        sample = samples.get(gpu.uuid, GpuSample())
        gpus.append({"index": gpu.index, "uuid": gpu.uuid, "name": gpu.name,
                     "memory_mib": gpu.memory_mib, "replica": holder,
                     "endpoint": endpoints.get(holder) if holder else None,
                     "utilization_pct": sample.utilization_pct,
                     "memory_used_mib": sample.memory_used_mib,
                     "temperature_c": sample.temperature_c})
    return web.json_response({"gpus": gpus})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    await registry.refresh(request.app[RECONCILER], request.app[ALLOCATOR],
                           request.app[GPU_SAMPLES])
    return web.Response(body=registry.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(reconciler: Reconciler, allocator: GpuAllocator, admin_token: str = "",
              gpu_samples: dict[str, GpuSample] | None = None,
              max_body_bytes: int = 100 * 1024 ** 2, dispatcher: Dispatcher | None = None,
              max_async_body_bytes: int = 1024 ** 3, auth: Auth | None = None
              ) -> web.Application:
    """The whole HTTP surface. Control bodies are small (1 MiB); call bodies stream."""
    app = web.Application(middlewares=[json_errors, admin_auth], client_max_size=1024 ** 2)
    app[RECONCILER] = reconciler
    app[ALLOCATOR] = allocator
    app[AUTH] = auth if auth is not None else Auth(admin=admin_token)
    app[GPU_SAMPLES] = gpu_samples if gpu_samples is not None else {}
    app[METRICS] = Metrics()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/gpus", list_gpus)
    add_control_api(app, list_endpoints, get_endpoint)
    add_data_plane(app, dispatcher.router if dispatcher else Router(reconciler), max_body_bytes)
    if dispatcher is not None:
        add_async_plane(app, dispatcher, max_async_body_bytes)
    add_openapi(app)
    return app
