"""Backups and restores of the state database, with real berthd processes, real SQLite files
and the real CLI: a backup taken under load restores every task accepted before it; restore
refuses what is not a usable berth database and a state dir a berthd is running on; an upgrade
keeps a copy of the database it migrates; a backup without room says so and harms nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from berth.store.backup import (
    KEEP_PREMIGRATION,
    BackupError,
    backup_version,
    keep_premigration_copy,
)
from berth.store.schema import MIGRATIONS, SCHEMA_VERSION
from helpers import Berthd, config_text


def berthd_restore(file: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "berth.daemon.main", "restore", str(file),
                           "--config", str(config)], capture_output=True, text=True, timeout=60)


def berth_cli(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "berth.daemon.cli", "--url",
                           f"http://127.0.0.1:{port}", *args], capture_output=True, text=True,
                          timeout=120)


def submit(port: int) -> str | None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/async/sink/echo", data=b"{}",
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return str(json.loads(resp.read())["id"])
    except (urllib.error.URLError, OSError):
        return None


def schema_db(path: Path, version: int) -> None:
    """A berth database at an older schema, as an older berthd left it."""
    conn = sqlite3.connect(path)
    for number in range(version):
        conn.executescript(f"BEGIN; {MIGRATIONS[number]}; PRAGMA user_version = {number + 1};"
                           " COMMIT;")
    conn.execute("INSERT INTO endpoints (name, spec, source, generation, created_at, "
                 "updated_at) VALUES ('old', '{}', 'api', 1, 0, 0)")
    conn.commit()
    conn.close()


@pytest.fixture
def config(tmp_path, network, model_image, docker_host):
    path = tmp_path / "config.toml"
    path.write_text(config_text(tmp_path / "state", network, model_image, {},
                                "min_free_disk = 0"))
    return path


def test_a_backup_taken_under_load_restores_every_task_accepted_before_it(tmp_path, config):
    d = Berthd(tmp_path, config)
    try:
        d.wait_message("READY=1")
        # Tasks of an endpoint that cannot start stay queued: every one stays in the database.
        assert d.request("POST", "/v1/endpoints", {"name": "sink",
                                                   "image": "berth-test/not-here:1"})[0] == 201
        accepted: list[tuple[float, str]] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                task = submit(d.port)
                if task is not None:
                    accepted.append((time.time(), task))

        submitter = threading.Thread(target=load)
        submitter.start()
        while len(accepted) < 50:
            time.sleep(0.01)
        began = time.time()
        saved = berth_cli(d.port, "backup", str(tmp_path / "backup.db"))
        ended = time.time()
        while len([t for t, _ in accepted if t > ended]) < 20:
            time.sleep(0.01)
        stop.set()
        submitter.join()
        assert saved.returncode == 0, saved.stderr
        assert "restore with: berthd restore" in saved.stdout
        refused = berthd_restore(tmp_path / "backup.db", config)  # berthd still runs
        assert refused.returncode == 3 and "in use by a running berthd" in refused.stderr
        d.signal(15)
        assert d.wait_exit() == 0
    finally:
        d.close()
    restored = berthd_restore(tmp_path / "backup.db", config)
    assert restored.returncode == 0, restored.stderr
    aside = restored.stdout.rsplit("kept as ", 1)[1].strip()
    assert Path(aside).exists()
    d = Berthd(tmp_path, config)
    try:
        d.wait_message("READY=1")
        status, body = d.get("/v1/tasks?limit=10000")
        assert status == 200
        found = {t["id"] for t in body["tasks"]}
    finally:
        d.close()
    before = {task for at, task in accepted if at < began}
    after = {task for at, task in accepted if at > ended}
    assert len(before) >= 50 and before <= found  # every task accepted before the backup
    assert not after & found  # and none accepted after it ended: it is that backup's state
    print(f"{len(accepted)} tasks accepted under load; {len(before)} before the backup, all "
          f"restored; {len(after)} after it, none restored; {len(found)} in the backup")


def test_restore_refuses_what_berth_cannot_use(tmp_path, config):
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    newer = tmp_path / "newer.db"
    schema_db(newer, SCHEMA_VERSION)
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    good = tmp_path / "good"  # a berth database, and beside it a file that is not one whose
    schema_db(good, SCHEMA_VERSION)  # name, cut at '#' in a URI, is the good one's
    tricky = tmp_path / "good#evil.db"
    tricky.write_bytes(os.urandom(4096))
    for file, message in ((junk, "not an SQLite database"), (other, "not berth's"),
                          (tricky, "not an SQLite database"),
                          (newer, "newer than this berthd supports"),
                          (tmp_path / "missing.db", "cannot be opened")):
        out = berthd_restore(file, config)
        assert out.returncode == 3 and message in out.stderr, (file, out.stderr)
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "state" / "berth.db").exists()  # nothing was replaced


def test_an_upgrade_keeps_a_copy_of_the_database_it_migrates(tmp_path):
    import asyncio

    from berth.store import Store

    state = tmp_path / "state"
    state.mkdir()
    schema_db(state / "berth.db", SCHEMA_VERSION - 1)

    async def open_and_close() -> None:
        store = await Store.open(state)
        assert await store.schema_version() == SCHEMA_VERSION
        await store.close()

    asyncio.run(open_and_close())
    [copy] = (state / "backups").glob("berth-v*.db")
    assert copy.name.startswith(f"berth-v{SCHEMA_VERSION - 1}-")
    assert backup_version(copy) == SCHEMA_VERSION - 1  # the old database as it was
    assert sqlite3.connect(copy).execute("SELECT name FROM endpoints").fetchall() == [("old",)]
    for _ in range(KEEP_PREMIGRATION + 2):
        keep_premigration_copy(state / "berth.db", SCHEMA_VERSION)
    assert len(list((state / "backups").glob("berth-v*.db"))) == KEEP_PREMIGRATION
    with pytest.raises(BackupError):
        backup_version(state / "backups")


def test_a_backup_without_room_is_refused_and_harms_nothing(tmp_path, network, model_image,
                                                          docker_host, small_disk):
    state = small_disk("8m")
    config = tmp_path / "config.toml"
    config.write_text(config_text(state, network, model_image, {}, "min_free_disk = 0"))
    d = Berthd(tmp_path, config)
    try:
        d.wait_message("READY=1")
        status, body = d.get("/v1/backup")
        assert status == 507 and body["error"]["code"] == "insufficient_storage"
        assert "bytes free in" in body["error"]["message"]
        out = berth_cli(d.port, "backup", str(tmp_path / "b.db"))
        assert out.returncode == 1 and "insufficient_storage" in out.stderr
        assert not (tmp_path / "b.db").exists() and not (tmp_path / "b.db.part").exists()
        assert not list(state.glob("backups/*"))  # no copy was begun
        assert d.get("/healthz")[0] == 200  # the daemon is unharmed
        assert d.request("POST", "/v1/endpoints", {"name": "x", "image": "img:1"})[0] == 201
    finally:
        d.close()


def test_a_restore_that_fails_leaves_the_old_state(tmp_path, small_disk):
    from berth.store.backup import restore

    state = small_disk("1m")
    schema_db(state / "berth.db", SCHEMA_VERSION)
    before = (state / "berth.db").read_bytes()
    big = tmp_path / "big.db"
    schema_db(big, SCHEMA_VERSION)
    conn = sqlite3.connect(big)
    conn.execute("CREATE TABLE filler (x BLOB)")
    conn.execute("INSERT INTO filler VALUES (zeroblob(2000000))")  # more than the disk holds
    conn.commit()
    conn.close()
    with pytest.raises(BackupError, match="cannot restore"):
        restore(big, state)
    assert (state / "berth.db").read_bytes() == before  # nothing moved aside, nothing lost
    assert not list(state.glob("berth.db.re*"))
