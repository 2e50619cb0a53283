"""Bounded state: rows past their age are deleted and their pages handed back to the disk.

Events, audit rows and finished tasks whose bodies and results are already purged go after
their configured ages (daemon.events_ttl_s, audit_ttl_s, finished_tasks_ttl_s); the database
runs with auto_vacuum = INCREMENTAL, so freed pages are returned a batch at a time instead of
in one long VACUUM. Replica rows are pruned by Store.prune_replicas, usage rows are kept
(they are hourly sums, small and wanted for a long time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiosqlite

VACUUM_PAGES = 2000  # pages handed back per prune pass (8 MiB at 4 KiB pages)


@dataclass(frozen=True)
class Pruned:
    events: int
    audit: int
    tasks: int
    pages_freed: int


class Retention:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db, self.path = db, path

    async def prune(self, events_before: float, audit_before: float,
                    tasks_before: float) -> Pruned:
        counts = []
        for sql, before in (
                ("DELETE FROM events WHERE ts < ?", events_before),
                ("DELETE FROM audit WHERE ts < ?", audit_before),
                ("DELETE FROM tasks WHERE purged_at IS NOT NULL AND finished_at < ?",
                 tasks_before)):
            cur = await self._db.execute(sql, (before,))
            counts.append(cur.rowcount)
        free_before = await self._pragma("freelist_count")
        await self._db.execute(f"PRAGMA incremental_vacuum({VACUUM_PAGES})")
        freed = free_before - await self._pragma("freelist_count")
        return Pruned(counts[0], counts[1], counts[2], freed)

    async def _pragma(self, name: str) -> int:
        async with self._db.execute(f"PRAGMA {name}") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    def size(self) -> int:
        """Bytes of the database and its write-ahead log."""
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"))
                   if p.exists())
