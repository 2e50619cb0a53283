"""Usage counts in SQLite: calls, errors and model tokens per principal, endpoint, model and
UTC hour (schema 6). Written in batches by the usage ledger (daemon.metering), read by /v1/usage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

ROWS_PER_STATEMENT = 500  # 8 values a row, well under SQLite's 32,766 variables
# What each group_by sums over, as SQL over the usage table.
GROUPS = {"hour": "hour", "day": "hour - hour % 86400", "token": "principal",
          "model": "endpoint || char(0) || model"}


@dataclass(frozen=True)
class UsageRow:
    """Counts to add to one (hour, principal, endpoint, model) cell."""

    hour: int
    principal: str
    endpoint: str
    model: str
    calls: int
    errors: int
    prompt_tokens: int
    completion_tokens: int


class UsageStore:
    """Each add is one statement per batch of rows: a batch is counted whole or not at all."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def add(self, rows: Sequence[UsageRow]) -> None:
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            await self._add(rows[start:start + ROWS_PER_STATEMENT])

    async def _add(self, rows: Sequence[UsageRow]) -> None:
        marks = ", ".join("(?, ?, ?, ?, ?, ?, ?, ?)" for _ in rows)
        values = [v for r in rows for v in (r.hour, r.principal, r.endpoint, r.model, r.calls,
                                             r.errors, r.prompt_tokens, r.completion_tokens)]
        await self._db.execute(
            "INSERT INTO usage (hour, principal, endpoint, model, calls, errors, prompt_tokens,"
            f" completion_tokens) VALUES {marks} ON CONFLICT (hour, principal, endpoint, model)"
            " DO UPDATE SET calls = calls + excluded.calls, errors = errors + excluded.errors,"
            " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
            " completion_tokens = completion_tokens + excluded.completion_tokens", values)

    async def tokens_since(self, since_hour: int) -> dict[str, int]:
        """Model tokens (prompt + completion) per principal from `since_hour` on."""
        async with self._db.execute(
                "SELECT principal, sum(prompt_tokens + completion_tokens) FROM usage"
                " WHERE hour >= ? GROUP BY principal", (since_hour,)) as cur:
            return {str(r[0]): int(r[1]) for r in await cur.fetchall()}

    async def summary(self, group_by: str, since: int, until: int | None,
                      endpoint: str | None, principal: str | None) -> list[dict[str, Any]]:
        """Sums per group (a key of GROUPS), oldest or first group first."""
        where: list[str] = ["hour >= ?"]
        args: list[int | str] = [since]
        for column, value in (("endpoint", endpoint), ("principal", principal)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if until is not None:
            where.append("hour < ?")
            args.append(until)
        key = GROUPS[group_by]
        sql = (f"SELECT {key} AS grp, sum(calls), sum(errors), sum(prompt_tokens),"
               f" sum(completion_tokens) FROM usage WHERE {' AND '.join(where)}"
               " GROUP BY grp ORDER BY grp")
        async with self._db.execute(sql, args) as cur:
            return [{"group": r[0], "calls": r[1], "errors": r[2], "prompt_tokens": r[3],
                     "completion_tokens": r[4]} for r in await cur.fetchall()]
