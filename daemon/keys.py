"""Shared objects of the aiohttp app, on typed keys (no module-level state)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from berth.scheduler.router import Router

if TYPE_CHECKING:
    from berth.daemon.auth import Auth
    from berth.daemon.metrics import Metrics

ROUTER = web.AppKey("router", Router)
UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
AUTH: web.AppKey[Auth] = web.AppKey("auth")
MAX_BODY = web.AppKey("max_body", int)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
