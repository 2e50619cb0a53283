"""Bounded state: old events, audit rows and finished tasks go, freed pages go back to the
disk; /metrics shows the database's size and the disk's free space; /healthz says when the
state disk is low."""

from __future__ import annotations

import signal
import time

from berth.store import EventRecord, Store, TaskRecord
from berth.store.audit import AuditRecord
from helpers import Berthd, config_text


def task(task_id: str, status: str, finished_at: float | None) -> TaskRecord:
    return TaskRecord(id=task_id, endpoint="e", method="POST", path="/x", query="",
                      headers=[], created_at=1.0, body=b"x" * 50_000, status=status,
                      finished_at=finished_at)


async def test_old_rows_go_and_their_pages_come_back(tmp_path):
    store = await Store.open(tmp_path)
    for i in range(200):
        ts = 100.0 if i < 150 else 10_000.0
        await store.add_event(EventRecord(ts=ts, kind="start", endpoint="e", replica=None,
                                          message="m" * 500))
        await store.audit.add(AuditRecord(ts, "admin", "-", "secret.set", "S", 200, "ok"))
    await store.tasks.add(task("old-purged", "succeeded", 100.0))
    await store.tasks.add(task("old-unpurged", "succeeded", 100.0))
    await store.tasks.add(task("queued", "queued", None))
    await store.tasks.mark_purged("old-purged", 200.0)
    pruned = await store.retention.prune(1000.0, 1000.0, 1000.0)
    assert (pruned.events, pruned.audit, pruned.tasks) == (150, 150, 1)
    assert pruned.pages_freed > 0  # incremental vacuum gave pages back
    assert len(await store.events()) == 50
    assert len(await store.audit.find()) == 50
    assert {t.id for t in await store.tasks.find()} == {"old-unpurged", "queued"}
    await store.close()


def test_the_prune_job_metrics_and_healthz(tmp_path, network, model_image, docker_host):
    config = tmp_path / "config.toml"
    config.write_text(config_text(tmp_path / "state", network, model_image, {},
                                  "events_ttl_s = 1.0\naudit_ttl_s = 1.0\n"
                                  "prune_interval_s = 0.3\nmin_free_disk = \"1000000g\""))
    d = Berthd(tmp_path, config)
    try:
        d.wait_message("READY=1")
        assert d.request("POST", "/v1/endpoints", {"name": "x", "image": "img:1"})[0] == 201
        assert d.get("/v1/events")[1]["events"] and d.get("/v1/audit")[1]["audit"]
        for _ in range(60):  # aged past 1 s, then pruned by the job
            if not d.get("/v1/events")[1]["events"] and not d.get("/v1/audit")[1]["audit"]:
                break
            time.sleep(0.1)
        assert not d.get("/v1/events")[1]["events"] and not d.get("/v1/audit")[1]["audit"]
        status, text = d.get_bytes("/metrics")
        lines = {line.split(" ")[0]: float(line.split(" ")[1])
                 for line in text.decode().splitlines() if line.startswith("berth_state_")}
        assert lines["berth_state_db_bytes"] > 0 and lines["berth_state_disk_free_bytes"] > 0
        status, health = d.get("/healthz")  # no disk here has 1000 TB free
        assert status == 200 and health["state_disk"].startswith("low: ")
        assert d.request("POST", "/async/x/echo", {})[0] == 507
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
    finally:
        d.close()
