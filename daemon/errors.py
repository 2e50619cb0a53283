"""The one error shape of every HTTP answer: {"error": {"code": ..., "message": ...}}."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


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


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None,
                   details: list[dict[str, str]] | None = None) -> web.Response:
    error: dict[str, object] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return web.json_response({"error": error}, status=status, headers=headers)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 400 if it is not JSON, 422 if it is not an object."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid", "the request body must be a JSON object",
                       details=[{"path": "", "message": "must be an object"}])
    return body
