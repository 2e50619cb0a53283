"""The OpenAI model list: `GET /v1/models` and `GET /v1/models/{model}`.

Answered from memory (the reconciler's pools), never starting a replica; each client sees
only the models it may call (its endpoint's, public ones, or all with the admin token or in
open mode). Keys come as `Authorization: Bearer` or `x-api-key`, as OpenAI clients send them.
Errors use the OpenAI shape that SDKs parse: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from berth.daemon.http_types import HasHeaders
from berth.daemon.keys import AUTH, RECONCILER
from berth.scheduler.pool import EndpointPool
from berth.scheduler.replica import ReplicaState

S = ReplicaState


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_exceeded"}


def error_object(status: int, code: str, message: str,
                 param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for an answer of `status` (berth's `code` kept)."""
    return {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
            "param": param, "code": code}


def openai_error(status: int, message: str, code: str, kind: str,
                 param: str | None = None) -> web.Response:
    """An error as OpenAI clients expect it (`kind` is OpenAI's `type`)."""
    return web.json_response({"error": {"message": message, "type": kind, "param": param,
                                        "code": code}}, status=status)


def presented_key(request: HasHeaders) -> str | None:
    given = request.headers.get("Authorization", "")
    if given.startswith("Bearer ") and len(given) > len("Bearer "):
        return given[len("Bearer "):]
    return request.headers.get("x-api-key") or None


def model_state(pool: EndpointPool) -> str:
    """ready | starting | cold | error, as a client deciding whether to wait reads it."""
    if pool.error:
        return "error"
    if pool.count(S.READY):
        return "ready"
    if pool.count(S.SLEEPING):
        return "sleeping"
    return "starting" if pool.count(S.PENDING, S.STARTING) else "cold"


def model_item(model: str, pool: EndpointPool) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": int(pool.created_at),
            "owned_by": "berth",
            "berth": {"endpoint": pool.name, "state": model_state(pool),
                      "ready_replicas": pool.count(S.READY)}}


def visible_models(request: web.Request) -> dict[str, EndpointPool] | web.Response:
    """model -> pool for every model the caller may call; a 401 for an unknown key."""
    auth, key = request.app[AUTH], presented_key(request)
    if key is not None and not auth.open and not auth.knows(key):
        return openai_error(401, "unknown or revoked API key", "unauthorized",
                            "invalid_request_error")
    return {model: pool for pool in sorted(request.app[RECONCILER].live_pools(),
                                           key=lambda p: p.name)
            if auth.allows(key, pool.name, pool.spec.public)
            for model in pool.spec.model_names}


async def list_models(request: web.Request) -> web.Response:
    models = visible_models(request)
    if isinstance(models, web.Response):
        return models
    return web.json_response({"object": "list",
                              "data": [model_item(m, p) for m, p in models.items()]})


async def get_model(request: web.Request) -> web.Response:
    models, wanted = visible_models(request), request.match_info["model"]
    if isinstance(models, web.Response):
        return models
    if wanted not in models:
        return openai_error(404, f"The model {wanted!r} does not exist or you do not have "
                            "access to it.", "model_not_found", "invalid_request_error",
                            "model")
    return web.json_response(model_item(wanted, models[wanted]))


def add_models_api(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
