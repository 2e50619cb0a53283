"""The SQLite store: migrations, WAL, GPU uniqueness, and clear errors for bad state dirs."""

from __future__ import annotations

import sqlite3
import stat

import pytest

from berth.store import EndpointRecord, EventRecord, ReplicaRecord, Store, StoreError
from berth.store.schema import SCHEMA_VERSION


async def test_fresh_store_is_migrated_in_wal_mode_with_private_file(tmp_path):
    store = await Store.open(tmp_path / "state")
    assert await store.schema_version() == SCHEMA_VERSION
    await store.close()
    path = tmp_path / "state" / "berth.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"endpoints", "replicas", "gpu_owners", "events", "secrets"} <= tables
    con.close()


async def test_reopen_keeps_data_and_does_not_migrate_twice(tmp_path):
    store = await Store.open(tmp_path)
    await store.save_endpoint(EndpointRecord(name="a", spec={"image": "x"}, source="config",
                                             generation=2))
    await store.close()
    store = await Store.open(tmp_path)
    [rec] = await store.endpoints()
    assert (rec.name, rec.spec, rec.source, rec.generation) == ("a", {"image": "x"}, "config", 2)
    await store.close()


async def test_newer_schema_is_refused_clearly(tmp_path):
    con = sqlite3.connect(tmp_path / "berth.db")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    con.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 5}, newer"):
        await Store.open(tmp_path)


async def test_a_file_that_is_not_sqlite_is_refused_clearly(tmp_path):
    (tmp_path / "berth.db").write_bytes(b"this is not a database, just text" * 100)
    with pytest.raises(StoreError, match="is not a usable SQLite database"):
        await Store.open(tmp_path)


async def test_a_state_dir_that_cannot_be_written_is_refused_clearly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the directory should be: fails even for root
    with pytest.raises(StoreError, match="cannot be written"):
        await Store.open(blocker / "state")


async def test_gpu_claims_are_unique_and_all_or_nothing(tmp_path):
    store = await Store.open(tmp_path)
    assert await store.claim_gpus("r1", ["g0", "g1"])
    assert not await store.claim_gpus("r2", ["g2", "g1"])  # g1 is taken: nothing claimed
    assert await store.gpu_owners() == {"g0": "r1", "g1": "r1"}
    await store.release_gpus("r1")
    assert await store.claim_gpus("r2", ["g2", "g1"])
    assert await store.gpu_owners() == {"g1": "r2", "g2": "r2"}
    await store.close()


async def test_replicas_events_and_secrets_round_trip(tmp_path):
    store = await Store.open(tmp_path)
    live = ReplicaRecord(id="a-1", endpoint="a", generation=1, state="ready", created_at=1.0,
                         gpus=["g0"], container_id="c1")
    gone = ReplicaRecord(id="a-2", endpoint="a", generation=1, state="stopped", created_at=2.0,
                         stopped_at=3.0)
    await store.save_replica(live)
    await store.save_replica(gone)
    assert await store.replicas(live_only=True) == [live]
    live.state = "draining"
    await store.save_replica(live)
    assert [r.state for r in await store.replicas()] == ["draining", "stopped"]
    await store.prune_replicas(older_than=10.0)
    assert [r.id for r in await store.replicas()] == ["a-1"]
    await store.add_event(EventRecord(ts=5.0, kind="start", message="m", endpoint="a"))
    await store.add_event(EventRecord(ts=6.0, kind="ready", message="m", endpoint="b"))
    assert [e.kind for e in await store.events("a")] == ["start"]
    assert [e.kind for e in await store.events(since=5.5)] == ["ready"]
    await store.put_secret("HF_TOKEN", "v1")
    await store.put_secret("HF_TOKEN", "v2")
    assert await store.secret_values(["HF_TOKEN", "MISSING"]) == {"HF_TOKEN": "v2"}
    assert await store.delete_secret("HF_TOKEN") and not await store.delete_secret("HF_TOKEN")
    await store.close()


async def test_task_backlog_counts_follow_every_change(tmp_path):
    """The trigger-kept backlog equals a recount after inserts, status moves and deletes."""
    import time as _time

    from berth.store import TaskRecord
    store = await Store.open(tmp_path)
    tasks = store.tasks
    for i in range(5):
        assert await tasks.add_within(TaskRecord(id=f"t{i}", endpoint="e", method="POST",
                                                 path="x", created_at=_time.time(),
                                                 body_size=10 * (i + 1)), 4, 10_000) == (i < 4)
    assert await tasks.backlog("e") == (4, 100)
    task = await tasks.get("t0")
    assert task is not None
    task.status = "running"
    await tasks.update(task, "status")
    assert await tasks.backlog("e") == (3, 100)  # running bodies still count as stored
    task.status = "succeeded"
    await tasks.update(task)
    assert await tasks.backlog("e") == (3, 90)
    assert await tasks.backlog("other") == (0, 0)
    await store.close()


async def test_a_token_for_an_endpoint_gone_is_not_stored(tmp_path):
    # A token created as its endpoint was deleted outlived it as an orphan row (found by
    # test_disconnects, seed 3995): the insert checks the endpoint in the same statement.
    store = await Store.open(tmp_path)
    await store.save_endpoint(EndpointRecord(name="a", spec={"image": "x"}, source="api",
                                             generation=1))
    assert await store.add_token("tok_1", "a", "hash-1") is not None
    await store.delete_endpoint("a")  # its tokens go with it
    assert await store.add_token("tok_2", "a", "hash-2") is None
    assert await store.add_token("tok_3", "never", "hash-3") is None
    assert await store.tokens("a") == [] and await store.tokens("never") == []
    await store.close()
