"""`GET /v1/usage` (admin): calls, errors and model tokens summed by hour, day, token or model,
over a time range and optionally one endpoint or token. What the ledger holds in memory is
flushed first, so the answer includes the calls that just ended."""

from __future__ import annotations

import datetime
import math
from typing import Any

from aiohttp import web

from berth.daemon.errors import ApiError
from berth.daemon.keys import STORE, USAGE
from berth.daemon.metering import HOUR
from berth.daemon.params import bad_query
from berth.store.usage import GROUPS

COUNTS = ("calls", "errors", "prompt_tokens", "completion_tokens")


def when(request: web.Request, name: str) -> int | None:
    """A time parameter as unix seconds: a number, or an ISO 8601 date or time (UTC if no
    zone is given); None when absent."""
    text = request.query.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise _invalid(name, "a unix time or an ISO 8601 date or time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        value = moment.timestamp()
    if not math.isfinite(value) or not 0 <= value < 2 ** 40:
        raise _invalid(name, "a unix time or an ISO 8601 date or time")
    return int(value)


def _invalid(name: str, wanted: str) -> ApiError:
    return bad_query(name, f"{name} must be {wanted}")


def group_item(group_by: str, value: Any) -> dict[str, Any]:
    if group_by == "token":
        return {"token": value}
    if group_by == "model":
        endpoint, model = str(value).split("\0", 1)
        return {"endpoint": endpoint, "model": model}
    start = datetime.datetime.fromtimestamp(int(value), datetime.UTC)
    label = start.strftime("%Y-%m-%d" if group_by == "day" else "%Y-%m-%dT%H:00Z")
    return {group_by: label, "start": int(value)}


async def usage_summary(request: web.Request) -> web.Response:
    group_by = request.query.get("group_by", "day")
    if group_by not in GROUPS:
        raise _invalid("group_by", "one of " + ", ".join(GROUPS))
    since, until = when(request, "since") or 0, when(request, "until")
    await request.app[USAGE].flush()
    rows = await request.app[STORE].usage.summary(
        group_by, since - since % HOUR, until, request.query.get("endpoint"),
        request.query.get("token"))
    usage = [{**group_item(group_by, r["group"]), **{k: r[k] for k in COUNTS}} for r in rows]
    total = {k: sum(r[k] for r in rows) for k in COUNTS}
    return web.json_response({"group_by": group_by, "since": since, "until": until,
                              "usage": usage, "total": total})
