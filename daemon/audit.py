"""The audit log: who changed what, from where, and how it ended.

Every control write is recorded (endpoints, tokens, secrets, task cancels), refused attempts
too (401, 403, 409, 422...), with time, actor (admin, a token's id, `none` or
`unknown-token`), remote address, action, target and outcome; config reloads by signal are
recorded by berthd's main loop. Never a secret value or a token: targets are names and ids.
Rows are written in the write's own shielded task (app.complete_writes), so a client that
leaves does not lose its row. `GET /v1/audit?since=&actor=&target=&limit=` (admin).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from berth.daemon.errors import ApiError, as_api_error
from berth.daemon.keys import AUTH, STORE
from berth.daemon.models_api import presented_key
from berth.daemon.params import query_limit, query_time
from berth.scheduler.errors import SchedulerError
from berth.store.audit import AuditRecord

log = structlog.get_logger("berth.audit")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TARGET_MAX = 256

# (method, route) -> action; the target is the route's {name} and {id}.
ACTIONS = {
    ("POST", "/v1/endpoints"): "endpoint.create",
    ("PUT", "/v1/endpoints/{name}"): "endpoint.replace",
    ("PATCH", "/v1/endpoints/{name}"): "endpoint.update",
    ("DELETE", "/v1/endpoints/{name}"): "endpoint.delete",
    ("POST", "/v1/endpoints/{name}/restart"): "endpoint.restart",
    ("POST", "/v1/endpoints/{name}/tokens"): "token.create",
    ("PATCH", "/v1/endpoints/{name}/tokens/{id}"): "token.update",
    ("DELETE", "/v1/endpoints/{name}/tokens/{id}"): "token.revoke",
    ("PUT", "/v1/secrets/{name}"): "secret.set",
    ("DELETE", "/v1/secrets/{name}"): "secret.delete",
    ("DELETE", "/tasks/{id}"): "task.cancel",
    ("POST", "/v1/gpus/{uuid}/cordon"): "gpu.cordon",
    ("POST", "/v1/gpus/{uuid}/uncordon"): "gpu.uncordon",
    ("POST", "/v1/gpus/{uuid}/healthy"): "gpu.healthy",
}


def action_of(request: web.Request) -> str | None:
    """The audited action a request asks for; None if it is not a control write."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return ACTIONS.get((request.method, resource.canonical))


def actor_of(request: web.Request) -> str:
    key = presented_key(request)
    if key is None:
        return "none"
    principal = request.app[AUTH].principal(key)  # "public" here: a key berth does not know
    return "unknown-token" if principal == "public" else principal


def target_of(request: web.Request, response: web.StreamResponse | None) -> str:
    info = request.match_info
    parts = [info[k] for k in ("name", "id") if k in info]
    keys: tuple[str, ...] = ("name", "id")
    if "uuid" in info:  # a GPU, named by uuid or index in the URL: its uuid is the target
        parts, keys = [], ("uuid",)
    if isinstance(response, web.Response) and response.status < 300 and \
            response.content_type == "application/json" and isinstance(response.body, bytes):
        answer = json.loads(response.body)  # berth's own answer: a new endpoint's or token's
        if isinstance(answer, dict):
            parts += [str(answer[k]) for k in keys
                      if isinstance(answer.get(k), str) and answer[k] not in parts]
    if "uuid" in info and not parts:
        parts = [info["uuid"]]  # refused: as the caller named it
    return "/".join(parts)[:TARGET_MAX] or "-"  # a URL's junk cannot grow a row


async def audited(request: web.Request, handler: Handler, action: str) -> web.StreamResponse:
    """Run the write and record how it ended, whatever happened."""
    response, status, outcome = None, 500, "internal"
    try:
        response = await handler(request)
        status, outcome = response.status, "ok" if response.status < 400 else "refused"
        return response
    except (ApiError, SchedulerError) as exc:
        error = as_api_error(exc)
        status, outcome = error.status, error.code
        raise
    except web.HTTPException as exc:
        status, outcome = exc.status, exc.reason
        raise
    finally:
        record = AuditRecord(time.time(), actor_of(request), request.remote or "-", action,
                             target_of(request, response), status, outcome)
        try:
            await request.app[STORE].audit.add(record)
        except Exception as exc:  # the write itself happened; its trace goes to the log
            log.warning("audit.not_stored", error=str(exc), **record.__dict__)


async def list_audit(request: web.Request) -> web.Response:
    rows = await request.app[STORE].audit.find(
        query_time(request, "since"), request.query.get("actor"),
        request.query.get("target"), query_limit(request))
    return web.json_response({"audit": rows})
