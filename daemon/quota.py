"""Per-token limits: requests per minute and model tokens per UTC day.

The decisions are pure functions of counts and time (`minute_wait`, `day_wait`); `Quota` owns
the one piece of state they need, each limited token's admission times of the last minute (in
memory: a restart forgets at most one minute). The daily count is the usage ledger's, loaded
from SQLite at start, so a day's budget holds across restarts. Tokens without limits, the admin
token and public callers are never limited here (slots and queues still apply).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from berth.daemon.errors import ApiError
from berth.daemon.metering import DAY, UsageLedger, day_of

MINUTE = 60.0


@dataclass(frozen=True)
class TokenLimits:
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None

    @property
    def any(self) -> bool:
        """Whether either limit is set (a token without any is never held back here)."""
        return self.requests_per_minute is not None or self.tokens_per_day is not None


def minute_wait(admitted: deque[float], rpm: int, now: float) -> float:
    """Seconds until one more call fits in the last minute's window (0: it fits now).
    `admitted` holds the admission times of the window, oldest first."""
    while admitted and admitted[0] <= now - MINUTE:
        admitted.popleft()
    if len(admitted) < rpm:
        return 0.0
    return admitted[len(admitted) - rpm] + MINUTE - now


def day_wait(used: int, tpd: int, now: float) -> float:
    """Seconds until the day's token budget frees (the next UTC midnight), 0 if some is left."""
    return 0.0 if used < tpd else day_of(now) + DAY - now


class Quota:
    """Admits a call of a token or says how long to wait (429 with a true Retry-After)."""

    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger
        self.windows: dict[str, deque[float]] = {}

    def admit(self, principal: str, limits: TokenLimits | None, now: float,
              tick: float) -> None:
        """`now` is wall time (UTC days), `tick` a monotonic clock (the minute window: a
        clock stepped back must not lock a token out)."""
        if limits is None:
            return
        if limits.tokens_per_day is not None:
            used = self.ledger.tokens_today(principal, now)
            wait = day_wait(used, limits.tokens_per_day, now)
            if wait:
                raise _limited(f"token {principal} used {used} of its "
                               f"{limits.tokens_per_day} model tokens of today (UTC)", wait)
        if limits.requests_per_minute is not None:
            window = self.windows.setdefault(principal, deque())
            wait = minute_wait(window, limits.requests_per_minute, tick)
            if wait:
                raise _limited(f"token {principal} made {len(window)} calls in the last "
                               f"minute; its limit is {limits.requests_per_minute}", wait)
            window.append(tick)

    def forget(self, principal: str) -> None:
        self.windows.pop(principal, None)


def _limited(message: str, wait: float) -> ApiError:
    return ApiError(429, "rate_limit_exceeded", message,
                    headers={"Retry-After": str(max(1, math.ceil(wait)))})
