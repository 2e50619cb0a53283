"""Copies of the state database: online backups, the copy kept before a schema migration, and
restoring a backup into a state directory no berthd is using.

Copies use SQLite's backup API on a connection of their own, in one step: one read transaction,
so the copy is consistent while berthd keeps writing (WAL readers do not block writers). A
running berthd holds an exclusive lock on `state_dir/berthd.lock`; restore takes the same lock,
so it cannot replace the database under a live daemon.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import shutil
import sqlite3
import time
from pathlib import Path

from berth.store.schema import SCHEMA_VERSION

DB_NAME = "berth.db"
LOCK_NAME = "berthd.lock"
BACKUPS = "backups"
KEEP_PREMIGRATION = 3
NEEDED_TABLES = {"endpoints", "replicas", "tasks", "events"}


class BackupError(Exception):
    """A copy or a restore cannot be made; the message says why and what to do."""


def lock_state_dir(state_dir: Path) -> int:
    """An exclusive lock on the state dir, held as long as the returned fd is open."""
    path = Path(state_dir) / LOCK_NAME
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise BackupError(f"{state_dir} is in use by a running berthd (pid {holder}); stop "
                          "it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def copy_database(source: Path, dest: Path) -> None:
    """A consistent copy of the database at `source` into `dest` (0600, fsynced)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600))
    src = sqlite3.connect(_read_only(source), uri=True)
    out = sqlite3.connect(dest)
    try:
        src.backup(out)  # all pages in one step: one snapshot
        out.execute("PRAGMA journal_mode = DELETE")  # a single file, no -wal beside it
    finally:
        out.close()
        src.close()
    with open(dest, "rb") as f:
        os.fsync(f.fileno())


def keep_premigration_copy(db: Path, version: int) -> Path:
    """backups/berth-v<version>-<time>.db before a migration; only the last few are kept."""
    folder = db.parent / BACKUPS
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    dest = folder / f"berth-v{version}-{stamp}.db"
    copy_database(db, dest)
    copies = sorted(folder.glob("berth-v*-*.db"), key=lambda p: p.stat().st_mtime)
    for old in copies[:-KEEP_PREMIGRATION]:
        old.unlink(missing_ok=True)
    return dest


def _read_only(path: Path) -> str:
    """A read-only SQLite URI of `path`, encoded: a '#' or '?' in a name would cut it short
    (so one file would be checked and another restored)."""
    return Path(path).resolve().as_uri() + "?mode=ro"


def backup_version(file: Path) -> int:
    """The schema version of a berth database file; BackupError if it is not one berth can use."""
    try:
        conn = sqlite3.connect(_read_only(file), uri=True)
    except sqlite3.Error as exc:
        raise BackupError(f"{file} cannot be opened: {exc}") from exc
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = "
                                             "'table'")}
        ok = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{file} is not an SQLite database ({exc})") from exc
    finally:
        conn.close()
    if not tables >= NEEDED_TABLES or version < 1:
        raise BackupError(f"{file} is an SQLite database but not berth's")
    if version > SCHEMA_VERSION:
        raise BackupError(f"{file} has schema version {version}, newer than this berthd "
                          f"supports ({SCHEMA_VERSION}); restore it with a newer berthd")
    if ok != "ok":
        raise BackupError(f"{file} is damaged: {ok}")
    return version


def restore(file: Path, state_dir: Path) -> Path | None:
    """Replace the state database with `file` (a checked berth backup). The replaced database
    (with its -wal and -shm) is kept aside; its path is returned (None if there was none)."""
    backup_version(file)
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = lock_state_dir(state_dir)
    incoming = state_dir / f"{DB_NAME}.restoring"
    try:
        # The copy is whole and on disk before anything of the old state moves: a full disk
        # fails the restore and leaves the state as it was.
        shutil.copyfile(file, incoming)
        os.chmod(incoming, 0o600)
        with open(incoming, "rb") as f:
            os.fsync(f.fileno())
        backup_version(incoming)  # what is restored is what was checked (the file may change)
        db = state_dir / DB_NAME
        old = [s for s in ("", "-wal", "-shm") if Path(f"{db}{s}").exists()]
        aside = state_dir / f"{DB_NAME}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
        for suffix in old:  # a stale -wal would otherwise be replayed onto the backup
            os.replace(f"{db}{suffix}", f"{aside}{suffix}")
        os.replace(incoming, db)
        _sync_dir(state_dir)
        return aside if old else None
    except OSError as exc:
        raise BackupError(f"cannot restore into {state_dir}: {exc.strerror or exc}") from exc
    finally:
        incoming.unlink(missing_ok=True)
        os.close(fd)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
