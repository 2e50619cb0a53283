"""The one error shape of every HTTP answer: {"error": {"code": ..., "message": ...}}."""

from __future__ import annotations

import errno
import json
import sqlite3
from typing import Any

from aiohttp import web

from berth.scheduler.errors import (
    EndpointFailing,
    EndpointNotFound,
    EngineUnavailable,
    NoCapacity,
    QueueFull,
    ReplicaNotFound,
    SchedulerError,
)


class ApiError(Exception):
    """An error answered as {"error": {"code": ..., "message": ...}} with `status`."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None,
                 details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details  # 422: one {"path", "message"} per wrong field


# The scheduler's refusals as HTTP: the one place their statuses and codes are chosen.
SCHEDULER_ERRORS: dict[type[SchedulerError], tuple[int, str]] = {
    EndpointNotFound: (404, "endpoint_not_found"),
    ReplicaNotFound: (404, "replica_not_found"),
    QueueFull: (429, "queue_full"),
    EndpointFailing: (503, "endpoint_error"),
    EngineUnavailable: (503, "docker_unavailable"),
    NoCapacity: (503, "no_capacity"),
}


def as_api_error(exc: ApiError | SchedulerError) -> ApiError:
    """The HTTP answer to an error; a scheduler error by the table above."""
    if isinstance(exc, ApiError):
        return exc
    status, code = next((v for k, v in SCHEDULER_ERRORS.items() if isinstance(exc, k)),
                        (503, "unavailable"))
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return ApiError(status, code, exc.message, headers)


def storage_error(exc: Exception) -> ApiError:
    """A failed write told as what it is: 507 for a full disk, 503 for anything else."""
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(exc, sqlite3.Error) and "full" in str(exc))
    if full:
        return ApiError(507, "insufficient_storage", "berth's state disk is full; nothing "
                        "was stored")
    return ApiError(503, "store_unavailable", "berth's state could not be written; try again",
                    headers={"Retry-After": "5"})


def error_document(code: str, message: str,
                   details: list[dict[str, str]] | None = None) -> dict[str, object]:
    error: dict[str, object] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None,
                   details: list[dict[str, str]] | None = None) -> web.Response:
    return web.json_response(error_document(code, message, details), status=status,
                             headers=headers)


MAX_JSON_DEPTH = 32  # far beyond any real spec; deeper documents are attacks on the parser


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed document (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item \
            if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json"))


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object: 415 unless sent as JSON (a web page cannot send that
    cross-origin without a preflight), 400 if it is not JSON or nests too deep, 422 if it is
    not an object."""
    if not is_json(request.content_type):
        raise ApiError(415, "unsupported_media_type", "this call takes a JSON body: send "
                       "Content-Type: application/json")
    too_deep = ApiError(400, "bad_json", f"the request body nests deeper than "
                        f"{MAX_JSON_DEPTH} levels")
    try:  # (bytes: JSON is UTF-8, and a charset nobody knows must not be a 500)
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad_json", "the request body is not valid JSON") from None
    except RecursionError:
        raise too_deep from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(body, dict):
        raise ApiError(422, "invalid", "the request body must be a JSON object",
                       details=[{"path": "", "message": "must be an object"}])
    return body
