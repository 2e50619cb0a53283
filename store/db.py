"""The SQLite store: the only code in berth that writes SQL.

One aiosqlite connection in WAL mode. Every write commits before it returns, so what a caller
was told is stored survives a crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from berth.gpu.allocator import GpuMark, GpuMarkKind
from berth.store.audit import AuditStore
from berth.store.backup import keep_premigration_copy
from berth.store.records import EndpointRecord, EventRecord, ReplicaRecord
from berth.store.retention import Retention
from berth.store.schema import MIGRATIONS, SCHEMA_VERSION
from berth.store.tasks import TaskStore
from berth.store.usage import UsageStore

DB_NAME = "berth.db"
log = structlog.get_logger("berth.store")
LIVE_STATES = ("pending", "starting", "ready", "sleeping", "draining")
TOKEN_LIMITS = ("requests_per_minute", "tokens_per_day")


class StoreError(Exception):
    """The state directory or database cannot be used; the message says why and what to do."""


class Store:
    """Endpoints, replicas, GPU ownership and events in one SQLite file."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self.tasks = TaskStore(db)
        self.usage = UsageStore(db)
        self.audit = AuditStore(db)
        self.retention = Retention(db, path)

    @classmethod
    async def open(cls, state_dir: str | Path) -> Store:
        """Open (creating if needed) the database under state_dir and migrate it."""
        path = Path(state_dir) / DB_NAME
        _prepare_file(path)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        store = cls(db, path)
        try:
            await store._setup()
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise StoreError(f"{path} is not a usable SQLite database ({exc}); move it away "
                             "or point daemon.state_dir elsewhere") from exc
        except StoreError:
            await db.close()
            raise
        return store

    async def _setup(self) -> None:
        db = self._db
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this berthd supports "
                f"({SCHEMA_VERSION}); run a newer berthd or point daemon.state_dir elsewhere")
        if 0 < version < SCHEMA_VERSION:  # an upgrade: the old database stays restorable
            try:
                kept = await asyncio.to_thread(keep_premigration_copy, self.path, version)
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(f"cannot keep a copy of {self.path} before migrating it from "
                                 f"schema {version}: {exc}; free space in its directory") from exc
            log.info("store.copy_kept", path=str(kept), schema=version,
                     message=f"copy of schema {version} kept before migrating")
        for number in range(version, SCHEMA_VERSION):
            await db.executescript(
                f"BEGIN; {MIGRATIONS[number]}; PRAGMA user_version = {number + 1}; COMMIT;")
        async with db.execute("PRAGMA auto_vacuum") as cur:
            row = await cur.fetchone()
        if row is not None and int(row[0]) != 2:  # once: freed pages go back in batches later
            try:
                await db.execute("PRAGMA auto_vacuum = INCREMENTAL")
                await db.execute("VACUUM")
            except sqlite3.Error as exc:  # e.g. no room for the rewrite: try at the next start
                log.warning("store.vacuum_deferred", error=str(exc))

    async def close(self) -> None:
        await self._db.close()

    async def schema_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # --- endpoints -------------------------------------------------------------------------

    async def endpoints(self) -> list[EndpointRecord]:
        async with self._db.execute("SELECT * FROM endpoints ORDER BY name") as cur:
            rows = await cur.fetchall()
        return [_endpoint(r) for r in rows]

    async def save_endpoint(self, rec: EndpointRecord) -> None:
        now = time.time()
        await self._db.execute(
            "INSERT INTO endpoints (name, spec, source, generation, error, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET spec = excluded.spec,"
            " source = excluded.source, generation = excluded.generation,"
            " error = excluded.error, updated_at = excluded.updated_at",
            (rec.name, json.dumps(rec.spec, sort_keys=True), rec.source, rec.generation,
             rec.error, rec.created_at or now, now))

    async def delete_endpoint(self, name: str) -> None:
        await self._db.execute("DELETE FROM endpoints WHERE name = ?", (name,))

    # --- replicas --------------------------------------------------------------------------

    async def save_replica(self, rec: ReplicaRecord) -> None:
        row = dataclasses.asdict(rec)
        row["gpus"] = json.dumps(rec.gpus)
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        updates = ", ".join(f"{c} = excluded.{c}" for c in row if c != "id")
        await self._db.execute(
            f"INSERT INTO replicas ({cols}) VALUES ({marks})"
            f" ON CONFLICT (id) DO UPDATE SET {updates}", tuple(row.values()))

    async def replicas(self, live_only: bool = False) -> list[ReplicaRecord]:
        sql = "SELECT * FROM replicas"
        args: tuple[str, ...] = ()
        if live_only:
            sql += f" WHERE state IN ({', '.join('?' for _ in LIVE_STATES)})"
            args = LIVE_STATES
        async with self._db.execute(sql + " ORDER BY created_at", args) as cur:
            rows = await cur.fetchall()
        return [_replica(r) for r in rows]

    async def prune_replicas(self, older_than: float) -> None:
        """Forget stopped and failed replicas that ended before `older_than`."""
        await self._db.execute(
            "DELETE FROM replicas WHERE state IN ('stopped', 'failed') AND stopped_at < ?",
            (older_than,))

    # --- GPU ownership (the GpuLedger of gpu.allocator) ------------------------------------

    async def claim_gpus(self, replica_id: str, uuids: Sequence[str]) -> bool:
        if not uuids:
            return True
        now = time.time()
        # One multi-row INSERT is atomic on its own: all GPUs are claimed or none is.
        rows = ", ".join("(?, ?, ?)" for _ in uuids)
        try:
            await self._db.execute(
                f"INSERT INTO gpu_owners (gpu_uuid, replica_id, since) VALUES {rows}",
                [v for u in uuids for v in (u, replica_id, now)])
        except sqlite3.IntegrityError:
            return False
        return True

    async def release_gpus(self, replica_id: str) -> None:
        await self._db.execute("DELETE FROM gpu_owners WHERE replica_id = ?", (replica_id,))
        await self._db.execute("DELETE FROM gpu_shares WHERE replica_id = ?", (replica_id,))
        await self._db.execute("DELETE FROM gpu_loans WHERE borrower = ?", (replica_id,))

    async def lend_gpus(self, borrower: str, uuids: Sequence[str]) -> bool:
        rows = ", ".join("(?, ?, ?)" for _ in uuids)
        now = time.time()
        try:  # one INSERT: every GPU is lent or none (one borrower per GPU: the primary key)
            await self._db.execute(f"INSERT INTO gpu_loans (gpu_uuid, borrower, since) "
                                   f"VALUES {rows}", [v for u in uuids for v in (u, borrower, now)])
        except sqlite3.IntegrityError:
            return False
        return True

    async def gpu_loans(self) -> dict[str, str]:
        async with self._db.execute("SELECT gpu_uuid, borrower FROM gpu_loans") as cur:
            rows = await cur.fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    async def claim_share(self, replica_id: str, uuid: str, memory_mib: int,
                          capacity_mib: int) -> bool:
        # One statement: the owner check, the sum and the insert cannot interleave.
        try:
            cur = await self._db.execute(
                "INSERT INTO gpu_shares (gpu_uuid, replica_id, memory_mib, since)"
                " SELECT ?, ?, ?, ? WHERE NOT EXISTS"
                " (SELECT 1 FROM gpu_owners WHERE gpu_uuid = ?)"
                " AND (SELECT COALESCE(SUM(memory_mib), 0) FROM gpu_shares"
                " WHERE gpu_uuid = ?) + ? <= ?",
                (uuid, replica_id, memory_mib, time.time(), uuid, uuid, memory_mib,
                 capacity_mib))
        except sqlite3.IntegrityError:  # the replica has a share there already
            return False
        claimed = cur.rowcount == 1
        await cur.close()
        return claimed

    async def gpu_shares(self) -> list[tuple[str, str, int]]:
        async with self._db.execute(
                "SELECT gpu_uuid, replica_id, memory_mib FROM gpu_shares") as cur:
            rows = await cur.fetchall()
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def gpu_owners(self) -> dict[str, str]:
        async with self._db.execute("SELECT gpu_uuid, replica_id FROM gpu_owners") as cur:
            rows = await cur.fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    async def gpu_marks(self) -> list[GpuMark]:
        async with self._db.execute("SELECT * FROM gpu_marks ORDER BY since") as cur:
            rows = await cur.fetchall()
        return [GpuMark(r["gpu_uuid"], GpuMarkKind(r["kind"]), r["reason"], r["since"])
                for r in rows]

    async def set_gpu_mark(self, mark: GpuMark) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO gpu_marks (gpu_uuid, kind, reason, since) VALUES (?, ?, ?, ?)",
            (mark.uuid, mark.kind.value, mark.reason, mark.since))

    async def clear_gpu_mark(self, uuid: str, kind: GpuMarkKind) -> bool:
        async with self._db.execute("DELETE FROM gpu_marks WHERE gpu_uuid = ? AND kind = ?",
                                    (uuid, kind.value)) as cur:
            return cur.rowcount > 0

    # --- access tokens ---------------------------------------------------------------------

    async def add_token(self, token_id: str, endpoint: str, digest: str,
                        rpm: int | None = None, tpd: int | None = None) -> float | None:
        """The token's creation time; None if its endpoint is gone (checked in the same
        statement: an endpoint deleted meanwhile took its tokens, and would miss this one)."""
        now = time.time()
        cur = await self._db.execute(
            "INSERT INTO tokens (id, endpoint, hash, created_at, requests_per_minute,"
            " tokens_per_day) SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS"
            " (SELECT 1 FROM endpoints WHERE name = ?)",
            (token_id, endpoint, digest, now, rpm, tpd, endpoint))
        return now if cur.rowcount == 1 else None

    async def set_token_limits(self, endpoint: str, token_id: str, limits: dict[str, Any]
                               ) -> bool:
        """Set requests_per_minute and/or tokens_per_day (None clears one); False if no such
        token."""
        sets = ", ".join(f"{k} = ?" for k in limits if k in TOKEN_LIMITS)
        if not sets:
            return any(t["id"] == token_id for t in await self.tokens(endpoint))
        cur = await self._db.execute(
            f"UPDATE tokens SET {sets} WHERE endpoint = ? AND id = ?",
            (*(v for k, v in limits.items() if k in TOKEN_LIMITS), endpoint, token_id))
        return cur.rowcount > 0

    async def tokens(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Tokens (id, endpoint, hash, created_at, requests_per_minute, tokens_per_day),
        oldest first."""
        sql = "SELECT * FROM tokens"
        args: tuple[str, ...] = ()
        if endpoint is not None:
            sql, args = sql + " WHERE endpoint = ?", (endpoint,)
        async with self._db.execute(sql + " ORDER BY created_at", args) as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def delete_token(self, endpoint: str, token_id: str) -> bool:
        cur = await self._db.execute("DELETE FROM tokens WHERE endpoint = ? AND id = ?",
                                     (endpoint, token_id))
        return cur.rowcount > 0

    # --- secrets ---------------------------------------------------------------------------

    async def put_secret(self, name: str, value: str) -> None:
        now = time.time()
        await self._db.execute(
            "INSERT INTO secrets (name, value, created_at, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value,"
            " updated_at = excluded.updated_at", (name, value, now, now))

    async def delete_secret(self, name: str) -> bool:
        cur = await self._db.execute("DELETE FROM secrets WHERE name = ?", (name,))
        return cur.rowcount > 0

    async def secrets(self) -> list[dict[str, Any]]:
        """Names and dates of stored secrets, never their values."""
        async with self._db.execute(
                "SELECT name, created_at, updated_at FROM secrets ORDER BY name") as cur:
            return [dict(r) for r in await cur.fetchall()]

    async def secret_values(self, names: Sequence[str]) -> dict[str, str]:
        """Values of the named secrets that exist (missing names are simply absent)."""
        if not names:
            return {}
        marks = ", ".join("?" for _ in names)
        async with self._db.execute(
                f"SELECT name, value FROM secrets WHERE name IN ({marks})", list(names)) as cur:
            rows = await cur.fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    # --- events ----------------------------------------------------------------------------

    async def add_event(self, event: EventRecord) -> int:
        """Store the event; its id (ids grow: followers resume after the last one seen)."""
        async with self._db.execute(
                "INSERT INTO events (ts, kind, endpoint, replica, message) VALUES (?, ?, ?, ?, ?)",
                (event.ts, event.kind, event.endpoint, event.replica, event.message)) as cur:
            return int(cur.lastrowid or 0)

    async def events(self, endpoint: str | None = None, since: float = 0.0,
                     limit: int = 1000) -> list[EventRecord]:
        sql = "SELECT * FROM events WHERE ts >= ?"
        args: list[Any] = [since]
        if endpoint is not None:
            sql += " AND endpoint = ?"
            args.append(endpoint)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        async with self._db.execute(sql, args) as cur:
            rows = await cur.fetchall()
        return [EventRecord(ts=r["ts"], kind=r["kind"], message=r["message"],
                            endpoint=r["endpoint"], replica=r["replica"], id=r["id"])
                for r in reversed(list(rows))]


def _prepare_file(path: Path) -> None:
    """Create the state dir and a 0600 database file, or say clearly why that is impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        probe = path.parent / ".berth-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(f"state directory {path.parent} cannot be written: {exc.strerror}; "
                         "fix its permissions or set daemon.state_dir") from exc


def _endpoint(row: Any) -> EndpointRecord:
    return EndpointRecord(name=row["name"], spec=json.loads(row["spec"]), source=row["source"],
                          generation=row["generation"], error=row["error"],
                          created_at=row["created_at"], updated_at=row["updated_at"])


def _replica(row: Any) -> ReplicaRecord:
    values = {k: row[k] for k in row.keys()}  # noqa: SIM118 - sqlite3.Row is not a mapping
    values["gpus"] = json.loads(values["gpus"])
    return ReplicaRecord(**values)
