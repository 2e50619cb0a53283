"""Query parameters, parsed strictly: a wrong one is a 422 naming it, never a 500."""

from __future__ import annotations

import math
import re

from aiohttp import web

from berth.daemon.errors import ApiError

DIGITS = re.compile(r"[0-9]{1,9}")


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


def query_time(request: web.Request, name: str) -> float:
    """A unix time (finite number), 0 when absent."""
    try:
        value = float(request.query.get(name, "0"))
        if not math.isfinite(value):
            raise ValueError("not finite")
    except ValueError:
        raise ApiError(422, "invalid", f"{name} must be a number (unix time)",
                       details=[{"path": name, "message": "not a number"}]) from None
    return value
