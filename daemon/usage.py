"""Usage accounting on the request side: whether a call streams, and asking a streamed
answer for its usage; and `flushing`, the ledger's task. What every call runs (the meter that
reads answers, the ledger that counts them) is daemon/metering.py, compiled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import structlog

from berth.daemon.metering import UsageLedger

log = structlog.get_logger("berth.usage")

STREAM_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})  # as model servers' parsers


def asks_to_stream(body: dict[str, Any]) -> bool:
    """Whether a model server will stream its answer: `stream` as lax parsers (pydantic's,
    vLLM's) read it, not only JSON's true, or a budget would miss `"stream": 1`."""
    value = body.get("stream")
    if isinstance(value, str):
        return value.strip().lower() in STREAM_WORDS
    return value is True or (not isinstance(value, bool) and value == 1)


def ask_usage(body: dict[str, Any]) -> bool:
    """Have a streamed OpenAI answer end with its usage (`stream_options.include_usage`): a
    token with a daily budget is counted even when its client did not ask. True if changed."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    if options.get("include_usage") is True:
        return False
    body["stream_options"] = {**options, "include_usage": True}
    return True


def usage_asked(raw: bytes) -> bytes:
    """A JSON request body that streams, asking for its usage (`raw` unchanged otherwise)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return raw  # not JSON: it goes as it came
    if isinstance(body, dict) and asks_to_stream(body) and ask_usage(body):
        return json.dumps(body).encode()
    return raw


@contextlib.asynccontextmanager
async def flushing(ledger: UsageLedger, now: float) -> AsyncIterator[None]:
    """The ledger loaded and flushed every flush_s while inside; flushed once more on exit."""
    await ledger.load(now)
    task = asyncio.get_running_loop().create_task(ledger.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            while ledger.pending:  # (and what calls ending meanwhile counted)
                await ledger.flush()
        except Exception as exc:
            log.warning("usage.flush_failed", error=str(exc), at="shutdown")
