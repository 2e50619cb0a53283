"""Query parameters, parsed strictly: a wrong one is a 400 `bad_query` naming it, never a
500."""

from __future__ import annotations

import math
import re

from aiohttp import web

from berth.daemon.errors import ApiError

DIGITS = re.compile(r"[0-9]{1,9}")


def bad_query(name: str, message: str) -> ApiError:
    return ApiError(400, "bad_query", message, details=[{"path": name, "message": message}])


def is_count(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() then refuses."""
    return DIGITS.fullmatch(text) is not None


def query_limit(request: web.Request, default: int = 1000, most: int = 10000) -> int:
    text = request.query.get("limit", str(default))
    if not is_count(text) or not 1 <= int(text) <= most:
        raise bad_query("limit", f"limit must be a whole number from 1 to {most}")
    return int(text)


def query_flag(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise bad_query(name, f"{name} must be true or false")
    return text in ("true", "1")


def query_time(request: web.Request, name: str) -> float:
    """A unix time (finite number), 0 when absent."""
    try:
        value = float(request.query.get(name, "0"))
        if not math.isfinite(value):
            raise ValueError("not finite")
    except ValueError:
        raise bad_query(name, f"{name} must be a number (unix time)") from None
    return value
