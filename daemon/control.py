"""The control API: endpoints (list, get, create, replace, patch, delete), their tokens,
secrets, GPUs and events. Every route here needs the admin token (add_admin_route).

Bodies are validated by the same pydantic models as the config file, so the API and the file
speak the same field names and give the same errors (422, every wrong field by its path).
Writes go to SQLite first and then to memory (the reconciler and Auth do it in that order).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from aiohttp import web
from pydantic import Field, ValidationError

from berth.daemon.audit import list_audit
from berth.daemon.auth import add_admin_route, digest
from berth.daemon.backup_api import get_backup
from berth.daemon.config import (
    ConfigIssue,
    EndpointSpec,
    Int,
    Strict,
    check_endpoint,
    gpu_shortage,
    issues_from_validation,
    model_clashes,
    volume_issues,
)
from berth.daemon.errors import ApiError, json_body
from berth.daemon.event_feed import follow_events
from berth.daemon.keys import (
    ALLOCATOR,
    AUTH,
    GPU_SAMPLES,
    IMAGES,
    LIMITS,
    RECONCILER,
    RUNTIME,
    STORE,
)
from berth.daemon.params import query_flag, query_limit, query_time
from berth.daemon.quota import TokenLimits
from berth.daemon.replica_logs import stream_logs
from berth.daemon.usage_api import usage_summary
from berth.gpu.inventory import attribute
from berth.scheduler.pool import EndpointPool, replica_containers
from berth.scheduler.replica import ReplicaState

SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def live_pool(request: web.Request) -> EndpointPool:
    """The endpoint named in the URL; 404 if there is none."""
    name = request.match_info["name"]
    pool = request.app[RECONCILER].pool(name)
    if pool is None:
        raise ApiError(404, "endpoint_not_found", f"no endpoint named {name!r}")
    return pool


def validate_spec(data: dict[str, Any], request: web.Request) -> EndpointSpec:
    """An EndpointSpec from API data, or 422 naming every wrong field by its path."""
    try:
        spec = EndpointSpec.model_validate(data)
    except ValidationError as exc:
        issues = issues_from_validation(exc)
    else:
        issues = check_endpoint(spec, "")
        issues += volume_issues(spec, request.app[LIMITS].volume_prefixes, "")
        allocator = request.app[ALLOCATOR]
        shortage = gpu_shortage(spec, allocator.gpus, allocator.reserve_mib)
        if shortage is not None:
            field = "gpu_memory" if shortage.startswith("gpu_memory") else "gpus"
            issues.append(ConfigIssue(field, shortage))
        if not issues:
            check_models(request, spec)
            return spec
    raise invalid(issues)


def invalid(issues: list[ConfigIssue]) -> ApiError:
    """422 naming every wrong field by its path, as the config check names them."""
    details = [{"path": i.path.lstrip("."), "message": i.message} for i in issues]
    return ApiError(422, "invalid", "; ".join(f"{d['path']}: {d['message']}" for d in details),
                    details=details)


def check_models(request: web.Request, spec: EndpointSpec) -> None:
    """409 when another endpoint already serves one of the spec's models."""
    others = [p.spec for p in request.app[RECONCILER].live_pools() if p.name != spec.name]
    for model, pair in model_clashes([*others, spec]).items():
        if spec.name in pair:
            other = pair[0] if pair[1] == spec.name else pair[1]
            raise ApiError(409, "model_conflict", f"model {model!r} is already served by "
                           f"endpoint {other}; model names are unique across endpoints",
                           details=[{"path": "models", "message": f"{model!r} is served by "
                                                                  f"{other}"}])


def writable_pool(request: web.Request, name: str) -> EndpointPool | None:
    """The live pool of an API-owned endpoint, None if there is none; 409 if the file owns it."""
    pool = request.app[RECONCILER].pool(name)
    if pool is None:
        return None
    if pool.source == "config":
        raise ApiError(409, "owned_by_config", f"endpoint {name} is declared in the config "
                       "file; change it there and reload")
    return pool


def gpu_names(request: web.Request) -> dict[str, Any]:
    return {g.uuid: {"index": g.index, "uuid": g.uuid, "name": g.name}
            for g in request.app[ALLOCATOR].gpus}


def describe(request: web.Request, pool: EndpointPool) -> dict[str, Any]:
    view = pool.describe(gpu_names(request))
    view["image"] = request.app[IMAGES].state(pool.spec.image)
    samples = request.app[GPU_SAMPLES]
    used, _ = attribute(samples, replica_containers([pool]))
    for replica in view["replicas"]:  # GPU memory its processes use (NVML), by GPU uuid
        replica["gpu_memory_used_mib"] = used.get(replica["id"], {})
    return view


async def list_endpoints(request: web.Request) -> web.Response:
    pools = sorted(request.app[RECONCILER].live_pools(), key=lambda p: p.name)
    return web.json_response({"endpoints": [describe(request, p) for p in pools]})


async def get_endpoint(request: web.Request) -> web.Response:
    pool = live_pool(request)
    view = describe(request, pool)
    if pool.spec.cache_dir:  # sized by the engine: only here, not in every list
        runtime = request.app[RUNTIME]
        volume = runtime.cache_volume(pool.name)
        try:
            size = await runtime.volume_size(volume)
        except Exception:  # the engine is away or slow: the view goes on without the size
            size = None
        view["cache"] = {"volume": volume, "path": pool.spec.cache_dir, "size_bytes": size}
    return web.json_response(view)


async def create_endpoint(request: web.Request) -> web.Response:
    data = await json_body(request)
    reconciler = request.app[RECONCILER]
    name = data.get("name")
    async with reconciler.endpoint_writes:
        if isinstance(name, str) and (writable_pool(request, name) is not None):
            raise ApiError(409, "endpoint_exists", f"endpoint {name} already exists")
        spec = validate_spec(data, request)
        await reconciler.put_endpoint(spec, "api")
    return web.json_response(describe(request, put_pool(request, spec.name)), status=201)


async def replace_endpoint(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    data = await json_body(request)
    if data.setdefault("name", name) != name:
        raise ApiError(422, "invalid", f"name in the body ({data['name']!r}) is not the "
                       f"name in the URL ({name!r})",
                       details=[{"path": "name", "message": "must match the URL"}])
    reconciler = request.app[RECONCILER]
    async with reconciler.endpoint_writes:
        existed = writable_pool(request, name) is not None
        await reconciler.put_endpoint(validate_spec(data, request), "api")
    return web.json_response(describe(request, put_pool(request, name)),
                             status=200 if existed else 201)


async def patch_endpoint(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if writable_pool(request, name) is None:
        raise ApiError(404, "endpoint_not_found", f"no endpoint named {name!r}")
    data = await json_body(request)
    if data.get("name", name) != name:
        raise ApiError(422, "invalid", "an endpoint cannot be renamed",
                       details=[{"path": "name", "message": "cannot change"}])
    reconciler = request.app[RECONCILER]
    async with reconciler.endpoint_writes:  # read, merge and write with no write between
        pool = writable_pool(request, name)
        if pool is None:
            raise ApiError(404, "endpoint_not_found", f"endpoint {name} was removed meanwhile")
        await reconciler.put_endpoint(validate_spec(merge_patch(pool.spec, data), request),
                                      "api")
    return web.json_response(describe(request, put_pool(request, name)))


def merge_patch(spec: EndpointSpec, data: dict[str, Any]) -> dict[str, Any]:
    """The spec with the PATCH body's fields; tables merge one level deep."""
    merged = spec.model_dump(mode="json")
    for key, value in data.items():  # one level deep: readiness = {period_s = 2} keeps path
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "env" \
                and key != "labels":
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


async def restart_endpoint(request: web.Request) -> web.Response:
    """Roll every replica to a fresh one (config-owned endpoints too: nothing in the file
    changes). The answer shows the new generation; its replicas follow."""
    reconciler = request.app[RECONCILER]
    async with reconciler.endpoint_writes:  # never after a DELETE it raced: 404 then
        pool = live_pool(request)
        await reconciler.restart_endpoint(pool.name)
    return web.json_response(describe(request, put_pool(request, pool.name)))


def put_pool(request: web.Request, name: str) -> EndpointPool:
    """The pool an endpoint write just made or changed; 404 if a DELETE came in between."""
    pool = request.app[RECONCILER].pool(name)
    if pool is None:
        raise ApiError(404, "endpoint_not_found", f"endpoint {name} was removed meanwhile")
    return pool


async def delete_endpoint(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    purge = query_flag(request, "purge_cache")
    reconciler = request.app[RECONCILER]
    async with reconciler.endpoint_writes:
        pool = writable_pool(request, name)
        if pool is None:
            raise ApiError(404, "endpoint_not_found", f"no endpoint named {name!r}")
        await reconciler.remove_endpoint(name, purge)
    stopping = sum(1 for r in pool.replicas.values()
                   if r.state not in (ReplicaState.STOPPED, ReplicaState.FAILED))
    return web.json_response({"name": name, "deleted": True, "replicas_stopping": stopping})


async def list_events(request: web.Request) -> web.StreamResponse:
    if query_flag(request, "follow"):
        return await follow_events(request)
    since, limit = query_time(request, "since"), query_limit(request)
    events = await request.app[STORE].events(request.query.get("endpoint"), since, limit)
    return web.json_response({"events": [
        {"id": e.id, "ts": e.ts, "kind": e.kind, "endpoint": e.endpoint, "replica": e.replica,
         "message": e.message} for e in events]})


# --- tokens and secrets -------------------------------------------------------------------

class TokenLimitsBody(Strict):
    """Limits of one endpoint token (POST and PATCH .../tokens[/{id}]); null: no limit."""

    requests_per_minute: Int | None = Field(None, ge=1, le=1_000_000)
    tokens_per_day: Int | None = Field(None, ge=1, le=10 ** 12)


async def limits_body(request: web.Request) -> dict[str, int | None]:
    """The limits a token call sets (only the fields given); 422 naming a wrong one."""
    if not request.body_exists:
        return {}
    data = await json_body(request)
    try:
        given = TokenLimitsBody.model_validate(data)
    except ValidationError as exc:
        raise invalid(issues_from_validation(exc)) from None
    return {k: getattr(given, k) for k in given.model_fields_set}


def token_view(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "endpoint": row["endpoint"], "created_at": row["created_at"],
            "requests_per_minute": row.get("requests_per_minute"),
            "tokens_per_day": row.get("tokens_per_day")}


async def create_token(request: web.Request) -> web.Response:
    name = live_pool(request).name
    limits = await limits_body(request)
    token, token_id = secrets.token_urlsafe(32), "tok_" + secrets.token_hex(6)
    created = await request.app[STORE].add_token(token_id, name, digest(token),
                                                 limits.get("requests_per_minute"),
                                                 limits.get("tokens_per_day"))
    if created is None:  # removed while its body was read
        raise ApiError(404, "endpoint_not_found", f"endpoint {name} was removed")
    request.app[AUTH].remember(token, name, token_id, TokenLimits(**limits))
    await request.app[RECONCILER].event("token_created", f"token {token_id} created", name)
    return web.json_response({**token_view({"id": token_id, "endpoint": name,
                                            "created_at": created, **limits}),
                              "token": token}, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    name = live_pool(request).name
    tokens = [token_view(t) for t in await request.app[STORE].tokens(name)]
    return web.json_response({"tokens": tokens})


async def patch_token(request: web.Request) -> web.Response:
    name, token_id = live_pool(request).name, request.match_info["id"]
    limits = await limits_body(request)
    store, auth = request.app[STORE], request.app[AUTH]
    if not await store.set_token_limits(name, token_id, limits):
        raise ApiError(404, "token_not_found", f"endpoint {name} has no token {token_id!r}")
    row = next((t for t in await store.tokens(name) if t["id"] == token_id), None)
    if row is None:  # revoked between the update and this read
        raise ApiError(404, "token_not_found", f"endpoint {name} has no token {token_id!r}")
    auth.set_limits(token_id, TokenLimits(row["requests_per_minute"], row["tokens_per_day"]))
    await request.app[RECONCILER].event("token_updated", f"token {token_id} limits: "
                                        f"{row['requests_per_minute']} requests/min, "
                                        f"{row['tokens_per_day']} tokens/day", name)
    return web.json_response(token_view(row))


async def revoke_token(request: web.Request) -> web.Response:
    name, token_id = live_pool(request).name, request.match_info["id"]
    if not await request.app[STORE].delete_token(name, token_id):
        raise ApiError(404, "token_not_found", f"endpoint {name} has no token {token_id!r}")
    request.app[AUTH].revoke(name, token_id)
    await request.app[RECONCILER].event("token_revoked", f"token {token_id} revoked", name)
    return web.json_response({"id": token_id, "revoked": True})


async def put_secret(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not SECRET_NAME.match(name):
        raise ApiError(422, "invalid", f"secret name {name!r} is not an environment variable "
                       "name", details=[{"path": "name", "message": "not an env var name"}])
    body = await json_body(request)
    value = body.get("value")
    if not isinstance(value, str) or set(body) != {"value"}:
        raise ApiError(422, "invalid", 'the body must be {"value": "<string>"}',
                       details=[{"path": "value", "message": "required string, no other key"}])
    await request.app[STORE].put_secret(name, value)
    await request.app[RECONCILER].event("secret_set", f"secret {name} set", None)
    request.app[RECONCILER].secret_changed(name)
    return web.json_response({"name": name, "stored": True})


async def delete_secret(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not await request.app[STORE].delete_secret(name):
        raise ApiError(404, "secret_not_found", f"no secret named {name!r}")
    await request.app[RECONCILER].event("secret_deleted", f"secret {name} deleted", None)
    return web.json_response({"name": name, "deleted": True})


async def list_secrets(request: web.Request) -> web.Response:
    return web.json_response({"secrets": await request.app[STORE].secrets()})


ROUTES = (
    ("GET", "/v1/endpoints", list_endpoints),
    ("POST", "/v1/endpoints", create_endpoint),
    ("GET", "/v1/endpoints/{name}", get_endpoint),
    ("PUT", "/v1/endpoints/{name}", replace_endpoint),
    ("PATCH", "/v1/endpoints/{name}", patch_endpoint),
    ("DELETE", "/v1/endpoints/{name}", delete_endpoint),
    ("POST", "/v1/endpoints/{name}/restart", restart_endpoint),
    ("GET", "/v1/endpoints/{name}/logs", stream_logs),
    ("POST", "/v1/endpoints/{name}/tokens", create_token),
    ("GET", "/v1/endpoints/{name}/tokens", list_tokens),
    ("PATCH", "/v1/endpoints/{name}/tokens/{id}", patch_token),
    ("DELETE", "/v1/endpoints/{name}/tokens/{id}", revoke_token),
    ("GET", "/v1/secrets", list_secrets),
    ("PUT", "/v1/secrets/{name}", put_secret),
    ("DELETE", "/v1/secrets/{name}", delete_secret),
    ("GET", "/v1/events", list_events),
    ("GET", "/v1/usage", usage_summary),
    ("GET", "/v1/backup", get_backup),
    ("GET", "/v1/audit", list_audit),
)


def add_control_api(app: web.Application) -> None:
    for method, path, handler in ROUTES:
        add_admin_route(app, method, path, handler)
