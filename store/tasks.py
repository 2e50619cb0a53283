"""Async tasks in SQLite (the rest of the store's SQL is in store.db)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import aiosqlite

from berth.store.records import TaskRecord

FINISHED = ("succeeded", "failed", "cancelled")
_COLUMNS = [f.name for f in dataclasses.fields(TaskRecord)]


class TaskStore:
    """Tasks: each write commits before it returns, so a 202 is only sent for a stored task."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def add(self, task: TaskRecord) -> None:
        row = _row(task)
        marks = ", ".join("?" for _ in row)
        await self._db.execute(f"INSERT INTO tasks ({', '.join(row)}) VALUES ({marks})",
                               tuple(row.values()))

    async def add_within(self, task: TaskRecord, max_queued: int,
                         max_bytes: int) -> bool:
        """Add a queued task unless its endpoint already has `max_queued` tasks queued or its
        queued and running bodies would pass `max_bytes`. One statement: two submits racing
        for the last place cannot both get it. The counts come from task_backlog, which
        triggers keep (schema 5): O(1), however many tasks are stored."""
        row = _row(task)
        marks = ", ".join("?" for _ in row)
        cursor = await self._db.execute(
            f"INSERT INTO tasks ({', '.join(row)}) SELECT {marks} WHERE"
            " coalesce((SELECT queued FROM task_backlog WHERE endpoint = ?), 0) < ? AND"
            " coalesce((SELECT bytes FROM task_backlog WHERE endpoint = ?), 0) + ? <= ?",
            (*row.values(), task.endpoint, max_queued, task.endpoint, task.body_size,
             max_bytes))
        return cursor.rowcount == 1

    async def backlog(self, endpoint: str) -> tuple[int, int]:
        """(tasks queued, bytes of queued and running bodies) of one endpoint."""
        async with self._db.execute(
                "SELECT queued, bytes FROM task_backlog WHERE endpoint = ?", (endpoint,)) as cur:
            row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def update(self, task: TaskRecord, *fields: str) -> None:
        """Write the named fields of the task (all but id when none are named)."""
        row = _row(task)
        names = fields or tuple(k for k in row if k != "id")
        sets = ", ".join(f"{n} = ?" for n in names)
        await self._db.execute(f"UPDATE tasks SET {sets} WHERE id = ?",
                               (*(row[n] for n in names), task.id))

    async def get(self, task_id: str) -> TaskRecord | None:
        async with self._db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)) as cur:
            row = await cur.fetchone()
        return _task(row) if row else None

    async def find(self, endpoint: str | None = None, status: str | None = None,
                   limit: int = 1000) -> list[TaskRecord]:
        """Newest first, without bodies."""
        sql = "SELECT * FROM tasks WHERE 1 = 1"
        args: list[str] = []
        if endpoint is not None:
            sql += " AND endpoint = ?"
            args.append(endpoint)
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        sql += " ORDER BY created_at DESC LIMIT ?"
        async with self._db.execute(sql, (*args, limit)) as cur:
            rows = await cur.fetchall()
        return [_task(r, with_bodies=False) for r in rows]

    async def counts(self) -> list[tuple[str, str, int]]:
        """(endpoint, status, number of tasks) for every pair that has any."""
        async with self._db.execute(
                "SELECT endpoint, status, COUNT(*) FROM tasks GROUP BY endpoint, status") as cur:
            return [(r[0], r[1], r[2]) for r in await cur.fetchall()]

    async def queued_ids(self) -> list[tuple[str, str]]:
        """(endpoint, id) of every queued task, oldest first."""
        async with self._db.execute(
                "SELECT endpoint, id FROM tasks WHERE status = 'queued' ORDER BY created_at"
        ) as cur:
            return [(str(r[0]), str(r[1])) for r in await cur.fetchall()]

    async def requeue_running(self) -> int:
        """After a crash: running tasks go back to queued (their attempt stays counted)."""
        cur = await self._db.execute(
            "UPDATE tasks SET status = 'queued', replica = NULL WHERE status = 'running'")
        return cur.rowcount

    async def pending_callbacks(self) -> list[str]:
        async with self._db.execute(
                "SELECT id FROM tasks WHERE callback_state = 'pending' AND status IN "
                "('succeeded', 'failed', 'cancelled') ORDER BY finished_at") as cur:
            return [str(r[0]) for r in await cur.fetchall()]

    async def expired(self, finished_before: float) -> list[TaskRecord]:
        """Finished, not yet purged tasks that ended before the given time."""
        async with self._db.execute(
                "SELECT * FROM tasks WHERE purged_at IS NULL AND finished_at < ? AND status IN "
                "('succeeded', 'failed', 'cancelled')", (finished_before,)) as cur:
            rows = await cur.fetchall()
        return [_task(r, with_bodies=False) for r in rows]

    async def mark_purged(self, task_id: str, when: float) -> None:
        await self._db.execute(
            "UPDATE tasks SET purged_at = ?, body = NULL, body_file = NULL, result_body = NULL,"
            " result_file = NULL WHERE id = ?", (when, task_id))

    async def cancel_queued_of(self, endpoint: str, when: float, reason: str) -> list[str]:
        """Cancel every queued task of an endpoint (it was deleted); their ids. Updated first,
        then named by what the update wrote: a task stored between a read and the update
        would be cancelled unnamed (no callback). (No RETURNING: SQLite 3.35 and later only.)"""
        await self._db.execute(
            "UPDATE tasks SET status = 'cancelled', finished_at = ?, error = ? "
            "WHERE endpoint = ? AND status = 'queued'", (when, reason, endpoint))
        async with self._db.execute(
                "SELECT id FROM tasks WHERE endpoint = ? AND status = 'cancelled' "
                "AND finished_at = ? AND error = ?", (endpoint, when, reason)) as cur:
            return [str(r[0]) for r in await cur.fetchall()]


def _row(task: TaskRecord) -> dict[str, Any]:
    row = dataclasses.asdict(task)
    row["headers"] = json.dumps(task.headers)
    return row


def _task(row: Any, with_bodies: bool = True) -> TaskRecord:
    values = {k: row[k] for k in _COLUMNS}
    values["headers"] = [tuple(pair) for pair in json.loads(values["headers"])]
    if not with_bodies:
        values["body"] = values["result_body"] = None
    return TaskRecord(**values)
