"""The audit log in SQLite (schema 7): one row per control write, written by daemon.audit."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import aiosqlite


@dataclass(frozen=True)
class AuditRecord:
    ts: float
    actor: str
    remote: str
    action: str
    target: str
    status: int
    outcome: str


class AuditStore:
    """Rows are only added (and, later, purged by age); each add commits before it returns."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def add(self, record: AuditRecord) -> None:
        row = asdict(record)
        await self._db.execute(
            f"INSERT INTO audit ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
            tuple(row.values()))

    async def find(self, since: float = 0.0, actor: str | None = None,
                   target: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Oldest first, from `since` on, optionally one actor's or one target's."""
        where: list[str] = ["ts >= ?"]
        args: list[Any] = [since]
        for column, value in (("actor", actor), ("target", target)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = (f"SELECT ts, actor, remote, action, target, status, outcome FROM audit WHERE "
               f"{' AND '.join(where)} ORDER BY id LIMIT ?")
        async with self._db.execute(sql, (*args, limit)) as cur:
            return [dict(r) for r in await cur.fetchall()]
