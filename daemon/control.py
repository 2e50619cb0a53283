"""Control API writes: endpoints (create, replace, patch, delete), tokens, secrets, events, logs.

Bodies are validated by the same pydantic models as the config file, so the API and the file
speak the same field names and give the same errors (422, every wrong field by its path).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from berth.daemon.auth import (
    create_token,
    delete_secret,
    list_secrets,
    list_tokens,
    put_secret,
    revoke_token,
)
from berth.daemon.config import (
    ConfigIssue,
    EndpointSpec,
    check_endpoint,
    gpu_shortage,
    issues_from_validation,
    volume_issues,
)
from berth.daemon.errors import ApiError, json_body
from berth.daemon.keys import ROUTER
from berth.scheduler.pool import EndpointPool
from berth.scheduler.reconciler import Reconciler
from berth.scheduler.replica import ReplicaState
from berth.scheduler.runtime import DockerRuntime

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DIGITS = re.compile(r"[0-9]{1,9}")
VOLUME_PREFIXES = web.AppKey("volume_prefixes", tuple[str, ...])

def reconciler_of(request: web.Request) -> Reconciler:
    return request.app[ROUTER].reconciler


def is_count(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() then refuses."""
    return DIGITS.fullmatch(text) is not None


def query_limit(request: web.Request, default: int = 1000, most: int = 10000) -> int:
    text = request.query.get("limit", str(default))
    if not is_count(text) or not 1 <= int(text) <= most:
        raise ApiError(422, "invalid", f"limit must be a whole number from 1 to {most}",
                       details=[{"path": "limit", "message": "out of range"}])
    return int(text)


def query_flag(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise ApiError(422, "invalid", f"{name} must be true or false",
                       details=[{"path": name, "message": "not a boolean"}])
    return text in ("true", "1")


def validate_spec(data: dict[str, Any], request: web.Request) -> EndpointSpec:
    """An EndpointSpec from API data, or 422 naming every wrong field by its path."""
    reconciler = reconciler_of(request)
    try:
        spec = EndpointSpec.model_validate(data)
    except ValidationError as exc:
        issues = issues_from_validation(exc)
    else:
        issues = check_endpoint(spec, "")
        issues += volume_issues(spec, request.app[VOLUME_PREFIXES], "")
        shortage = gpu_shortage(spec, reconciler.allocator.gpus)
        if shortage is not None:
            issues.append(ConfigIssue("gpus", shortage))
        if not issues:
            return spec
    details = [{"path": i.path.lstrip("."), "message": i.message} for i in issues]
    raise ApiError(422, "invalid", "; ".join(f"{d['path']}: {d['message']}" for d in details),
                   details=details)


def writable_pool(request: web.Request, name: str) -> EndpointPool | None:
    """The live pool of an API-owned endpoint, None if there is none; 409 if the file owns it."""
    pool = reconciler_of(request).pools.get(name)
    if pool is None or pool.removed:
        return None
    if pool.source == "config":
        raise ApiError(409, "owned_by_config", f"endpoint {name} is declared in the config "
                       "file; change it there and reload")
    return pool


def describe(request: web.Request, pool: EndpointPool) -> dict[str, Any]:
    names = {g.uuid: {"index": g.index, "uuid": g.uuid, "name": g.name}
             for g in reconciler_of(request).allocator.gpus}
    return pool.describe(names)


async def create_endpoint(request: web.Request) -> web.Response:
    data = await json_body(request)
    reconciler = reconciler_of(request)
    name = data.get("name")
    if isinstance(name, str) and (writable_pool(request, name) is not None):
        raise ApiError(409, "endpoint_exists", f"endpoint {name} already exists")
    spec = validate_spec(data, request)
    await reconciler.put_endpoint(spec, "api")
    return web.json_response(describe(request, reconciler.pools[spec.name]), status=201)


async def replace_endpoint(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    data = await json_body(request)
    if data.setdefault("name", name) != name:
        raise ApiError(422, "invalid", f"name in the body ({data['name']!r}) is not the "
                       f"name in the URL ({name!r})",
                       details=[{"path": "name", "message": "must match the URL"}])
    existed = writable_pool(request, name) is not None
    reconciler = reconciler_of(request)
    await reconciler.put_endpoint(validate_spec(data, request), "api")
    return web.json_response(describe(request, reconciler.pools[name]),
                             status=200 if existed else 201)


async def patch_endpoint(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    pool = writable_pool(request, name)
    if pool is None:
        raise ApiError(404, "endpoint_not_found", f"no endpoint named {name!r}")
    data = await json_body(request)
    if data.get("name", name) != name:
        raise ApiError(422, "invalid", "an endpoint cannot be renamed",
                       details=[{"path": "name", "message": "cannot change"}])
    merged = pool.spec.model_dump(mode="json")
    for key, value in data.items():  # one level deep: readiness = {period_s = 2} keeps path
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "env" \
                and key != "labels":
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    reconciler = reconciler_of(request)
    await reconciler.put_endpoint(validate_spec(merged, request), "api")
    return web.json_response(describe(request, reconciler.pools[name]))


async def delete_endpoint(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    pool = writable_pool(request, name)
    if pool is None:
        raise ApiError(404, "endpoint_not_found", f"no endpoint named {name!r}")
    await reconciler_of(request).remove_endpoint(name)
    stopping = sum(1 for r in pool.replicas.values()
                   if r.state not in (ReplicaState.STOPPED, ReplicaState.FAILED))
    return web.json_response({"name": name, "deleted": True, "replicas_stopping": stopping})


async def stream_logs(request: web.Request) -> web.StreamResponse:
    """Replica logs as text, each line prefixed with its replica, until the client leaves
    (follow=true) or the logs end."""
    name = request.match_info["name"]
    pool = reconciler_of(request).pools.get(name)
    if pool is None or pool.removed:
        raise ApiError(404, "endpoint_not_found", f"no endpoint named {name!r}")
    tail_text = request.query.get("tail", "100")
    if not is_count(tail_text) and tail_text != "all":
        raise ApiError(422, "invalid", "tail must be a number of lines or 'all'",
                       details=[{"path": "tail", "message": "not a number"}])
    follow = query_flag(request, "follow")
    wanted = request.query.get("replica")
    replicas = [r for r in pool.replicas.values() if r.container_id
                and (wanted is None or r.id == wanted)]
    if wanted is not None and not replicas:
        raise ApiError(404, "replica_not_found", f"endpoint {name} has no replica {wanted!r}")
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    logs = ReplicaLogs(reconciler_of(request).runtime, follow)
    tail = int(tail_text) if is_count(tail_text) else "all"
    for replica in replicas:
        logs.add(replica.id, str(replica.container_id), tail)
    try:
        async for line in logs.lines(pool, wanted):
            await response.write(line)
    finally:
        logs.close()
    await response.write_eof()
    return response


class ReplicaLogs:
    """The log lines of an endpoint's replicas, merged and prefixed with the replica. When
    following, replicas started after the stream began join it, from their first line."""

    RESCAN_S = 1.0
    MAX_BEHIND = 10_000  # lines a slow client may fall behind before its stream is cut

    def __init__(self, runtime: DockerRuntime, follow: bool,
                 max_behind: int = MAX_BEHIND) -> None:
        self.runtime = runtime
        self.follow = follow
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=max_behind)
        self.readers: dict[str, asyncio.Task[None]] = {}
        self.open = 0  # readers that have not ended
        self.cut = False  # a reader found the queue full: the client reads too slowly

    def add(self, replica_id: str, container_id: str, tail: int | str) -> None:
        self.open += 1
        self.readers[replica_id] = asyncio.get_running_loop().create_task(
            self._read(replica_id, container_id, tail))

    async def _read(self, replica_id: str, container_id: str, tail: int | str) -> None:
        prefix, buffer = f"[{replica_id}] ".encode(), b""
        try:
            async for chunk in self.runtime.stream_logs(container_id, tail, self.follow):
                *whole, buffer = (buffer + chunk).split(b"\n")
                for line in whole:
                    self._put(prefix + line + b"\n")
            if buffer:
                self._put(prefix + buffer + b"\n")
        except asyncio.QueueFull:
            self.cut = True  # never buffer without bound for a client that does not read
        finally:
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)

    def _put(self, line: bytes) -> None:
        self.queue.put_nowait(line)

    async def lines(self, pool: EndpointPool, wanted: str | None) -> AsyncIterator[bytes]:
        while self.follow or self.open or not self.queue.empty():
            if self.cut:
                yield (f"[berth] log stream cut: the client fell {self.queue.maxsize} lines "
                       "behind\n").encode()
                return
            if self.follow:
                for r in list(pool.replicas.values()):
                    if r.container_id and r.id not in self.readers and wanted in (None, r.id):
                        self.add(r.id, r.container_id, "all")
            try:
                line = await asyncio.wait_for(self.queue.get(),
                                              self.RESCAN_S if self.follow else None)
            except TimeoutError:
                continue
            if line is None:
                self.open -= 1
            else:
                yield line

    def close(self) -> None:
        for reader in self.readers.values():
            reader.cancel()


async def list_events(request: web.Request) -> web.Response:
    try:
        since = float(request.query.get("since", "0"))
        if not math.isfinite(since):
            raise ValueError("not finite")
    except ValueError:
        raise ApiError(422, "invalid", "since must be a number (unix time)",
                       details=[{"path": "since", "message": "not a number"}]) from None
    limit = query_limit(request)
    events = await reconciler_of(request).store.events(request.query.get("endpoint"), since,
                                                       limit)
    return web.json_response({"events": [
        {"id": e.id, "ts": e.ts, "kind": e.kind, "endpoint": e.endpoint, "replica": e.replica,
         "message": e.message} for e in events]})


def add_control_api(app: web.Application, list_endpoints: Handler,
                    get_endpoint: Handler, volume_prefixes: tuple[str, ...] = ()) -> None:
    app[VOLUME_PREFIXES] = volume_prefixes
    app.router.add_get("/v1/endpoints", list_endpoints)
    app.router.add_post("/v1/endpoints", create_endpoint)
    app.router.add_get("/v1/endpoints/{name}", get_endpoint)
    app.router.add_put("/v1/endpoints/{name}", replace_endpoint)
    app.router.add_patch("/v1/endpoints/{name}", patch_endpoint)
    app.router.add_delete("/v1/endpoints/{name}", delete_endpoint)
    app.router.add_get("/v1/endpoints/{name}/logs", stream_logs)
    app.router.add_post("/v1/endpoints/{name}/tokens", create_token)
    app.router.add_get("/v1/endpoints/{name}/tokens", list_tokens)
    app.router.add_delete("/v1/endpoints/{name}/tokens/{id}", revoke_token)
    app.router.add_get("/v1/secrets", list_secrets)
    app.router.add_put("/v1/secrets/{name}", put_secret)
    app.router.add_delete("/v1/secrets/{name}", delete_secret)
    app.router.add_get("/v1/events", list_events)
