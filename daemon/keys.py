"""Every shared object of the aiohttp app, on one typed key per service (no module-level
state). build_app (daemon/app.py) sets them all; handlers read only these, never one service
through another."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from berth.daemon.upstream import UpstreamPool
from berth.gpu import GpuAllocator, GpuSample
from berth.gpu.inventory import GpuReadings
from berth.scheduler.dispatch import Dispatcher
from berth.scheduler.egress import CallbackPolicy
from berth.scheduler.images import ImagePuller
from berth.scheduler.reconciler import Reconciler
from berth.scheduler.router import Router
from berth.scheduler.runtime import DockerRuntime
from berth.store import Store

if TYPE_CHECKING:
    from berth.daemon.auth import Auth
    from berth.daemon.browser import BrowserGuard
    from berth.daemon.deadlines import Deadlines
    from berth.daemon.event_feed import EventFeed
    from berth.daemon.metering import UsageLedger
    from berth.daemon.metrics import Metrics
    from berth.daemon.pacing import CallPacer
    from berth.daemon.proxy import RequestIds
    from berth.daemon.quota import Quota


@dataclass(frozen=True)
class Limits:
    """What callers may send: body sizes, free disk for async bodies, mountable host paths."""

    max_body: int = 100 * 1024 ** 2
    max_async_body: int = 1024 ** 3
    min_free_disk: int = 0
    volume_prefixes: tuple[str, ...] = ()
    body_timeout_s: float = 60.0  # an OpenAI call's body, read before routing, must come in this


@dataclass(frozen=True, slots=True)
class DataPlane:
    """What every model call uses, read with one lookup: each `app[KEY]` is a Python call,
    and a call made a dozen of them. The same objects as under their own keys (and the call
    deadlines' shared timer, only here)."""

    router: Router
    auth: Auth
    quota: Quota
    limits: Limits
    upstream: UpstreamPool
    metrics: Metrics
    usage: UsageLedger
    request_ids: RequestIds
    deadlines: Deadlines
    pacer: CallPacer  # new calls on berth's front begin a few per pass of the loop


STORE = web.AppKey("store", Store)
RECONCILER = web.AppKey("reconciler", Reconciler)
RUNTIME = web.AppKey("runtime", DockerRuntime)
IMAGES = web.AppKey("images", ImagePuller)
ALLOCATOR = web.AppKey("allocator", GpuAllocator)
ROUTER = web.AppKey("router", Router)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
CALLBACK_POLICY = web.AppKey("callback_policy", CallbackPolicy)
AUTH: web.AppKey[Auth] = web.AppKey("auth")
BROWSER: web.AppKey[BrowserGuard] = web.AppKey("browser")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
UPSTREAM = web.AppKey("upstream", UpstreamPool)
REQUEST_IDS: web.AppKey[RequestIds] = web.AppKey("request_ids")
GPU_SAMPLES = web.AppKey("gpu_samples", dict[str, GpuSample])
GPU_READINGS = web.AppKey("gpu_readings", GpuReadings)
LIMITS = web.AppKey("limits", Limits)
# Routes that need the admin token (the admin_auth middleware checks membership).
ADMIN_ROUTES = web.AppKey("admin_routes", set[web.AbstractRoute])
# Writes whose clients left, still running to their end (complete_writes middleware).
WRITES = web.AppKey("writes", set[asyncio.Future[web.StreamResponse]])
OPENAPI = web.AppKey("openapi", dict[str, Any])
USAGE: web.AppKey[UsageLedger] = web.AppKey("usage")
QUOTA: web.AppKey[Quota] = web.AppKey("quota")
EVENTS: web.AppKey[EventFeed] = web.AppKey("events")
DATA_PLANE = web.AppKey("data_plane", DataPlane)
