"""The one error shape of every HTTP answer: {"error": {"code": ..., "message": ...}}."""

from __future__ import annotations

from aiohttp import web


class ApiError(Exception):
    """An error answered as {"error": {"code": ..., "message": ...}} with `status`."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers=headers)
