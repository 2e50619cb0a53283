"""NVML through the replay of a recorded probe (tests/fixtures/nvml-4xh100.json, written from
NVIDIA's documentation: no real GPU was lent yet): the inventory and sampler read it as from a
driver, the probe script prints it back, Xid and ECC events are judged, and a replayed Xid 79
("fell off the bus") takes its GPU out of service and moves the replica with no call lost."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from berth.gpu import GpuMarkKind
from berth.gpu.health import GpuHealthWatch, event_verdict, on_loop
from berth.gpu.inventory import NvmlInventory, container_in_cgroup
from berth.gpu.nvml_replay import ReplayNvml
from berth.scheduler.replica import ReplicaState
from helpers import ROOT, CallsInFlight, body, ready_count, wait_for

FIXTURE = ROOT / "tests" / "fixtures" / "nvml-4xh100.json"
ADMIN = {"Authorization": "Bearer admin-secret"}
MIB = 1024 ** 2
S = ReplicaState


def test_the_inventory_and_sampler_read_nvml_as_recorded():
    inventory = NvmlInventory(ReplayNvml.load(FIXTURE))
    assert [(g.index, g.name, g.memory_mib) for g in inventory.gpus] == [
        (i, "NVIDIA H100 80GB HBM3", 81559) for i in range(4)]
    first = inventory.sample()[inventory.gpus[0].uuid]
    assert (first.utilization_pct, first.memory_used_mib, first.temperature_c) == (87, 30211, 31)


def test_a_lost_gpu_is_said_by_the_sampler_and_the_others_still_sampled():
    nvml = ReplayNvml.load(FIXTURE)
    inventory = NvmlInventory(nvml)
    nvml.lost.add(2)
    samples = inventory.sample()
    assert len(samples) == 3 and inventory.gpus[2].uuid not in samples
    assert inventory.lost == {inventory.gpus[2].uuid: "NVML: GPU is lost"}
    nvml.lost.discard(2)  # repaired: it answers again, and is no longer said lost
    assert len(inventory.sample()) == 4 and inventory.lost == {}


def test_the_probe_prints_what_berth_reads():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu-probe"), "--replay",
                          str(FIXTURE)], capture_output=True, text=True, timeout=60, check=True)
    printed, recorded = json.loads(out.stdout), json.loads(FIXTURE.read_text())
    assert printed["devices"] == recorded["devices"]
    assert printed["driver_version"] == recorded["driver_version"]
    assert "WRITTEN FROM NVIDIA" in recorded["_provenance"]  # not from a real GPU (yet)


@pytest.mark.parametrize(("event_type", "xid", "verdict"), [
    (0x8, 79, "Xid 79 (fell off the bus)"),
    (0x8, 48, "Xid 48 (double-bit ECC error)"),
    (0x8, 119, "Xid 119 (GSP timeout)"),
    (0x8, 61, "Xid 61"),                       # critical, meaning not in our table
    (0x8, 13, None), (0x8, 31, None), (0x8, 43, None),   # the application's own faults
    (0x8, 45, None), (0x8, 68, None), (0x8, 109, None),
    (0x2, 0, "double-bit ECC error"),
    (0x1, 0, None),                            # single-bit ECC: corrected
    (0x4, 0, None),                            # P-state change
])
def test_event_verdicts(event_type, xid, verdict):
    assert event_verdict(event_type, xid) == verdict


async def test_a_replayed_xid_79_moves_the_replica_to_a_healthy_gpu_with_no_call_lost(api):
    nvml = ReplayNvml.load(FIXTURE)
    inventory = NvmlInventory(nvml)
    h, client = await api(gpus=list(inventory.gpus))
    await client.post("/v1/endpoints", headers=ADMIN, json=body("m", min_replicas=1, gpus=1))
    pool = h.reconciler.pool("m")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [first] = pool.replicas.values()
    sick = first.gpus[0]
    index = next(g.index for g in inventory.gpus if g.uuid == sick)
    watch = GpuHealthWatch(nvml, inventory.handles,
                           on_loop(asyncio.get_running_loop(), h.reconciler.gpu_sick), wait_ms=50)
    watch.start()
    try:
        async with CallsInFlight(client, "/invoke/m/sleep?s=0.05", 2, ADMIN) as calls:
            await asyncio.sleep(0.2)
            nvml.push({"device": index, "type": "xid_critical", "xid": 13})  # the app's: no
            nvml.push({"device": index, "type": "xid_critical", "xid": 79, "then_lost": True})
            await wait_for(pool, lambda: first.state is S.STOPPED, what="moved off the GPU")
            await wait_for(pool, lambda: ready_count(pool) == 1, what="replacement ready")
            await asyncio.sleep(0.2)
    finally:
        watch.stop()
    statuses = calls.statuses
    [second] = [r for r in pool.replicas.values() if r.state is S.READY]
    assert second.gpus != [sick]
    assert set(statuses) == {200} and len(statuses) > 5  # no call lost
    marks = h.reconciler.allocator.marks(sick)
    assert marks[GpuMarkKind.UNHEALTHY].reason == "Xid 79 (fell off the bus)"
    view = {g["uuid"]: g for g in
            (await (await client.get("/v1/gpus", headers=ADMIN)).json())["gpus"]}
    assert view[sick]["healthy"] is False and view[sick]["health_reason"].startswith("Xid 79")
    events = [(e.kind, e.message) for e in await h.store.events()]
    assert ("gpu_unhealthy", f"GPU {sick} unhealthy: Xid 79 (fell off the bus)") in events
    resp = await client.post(f"/v1/gpus/{index}/healthy", headers=ADMIN)  # repaired
    assert resp.status == 200 and (await resp.json())["healthy"] is True
    assert h.reconciler.allocator.marks(sick) == {}


@pytest.mark.parametrize(("cgroup", "container"), [
    ("0::/docker/" + "a" * 64 + "\n", "a" * 64),                                  # cgroupfs
    ("0::/system.slice/docker-" + "b" * 64 + ".scope\n", "b" * 64),               # systemd
    ("9:name=systemd:/docker/" + "c" * 64 + "\n0::/docker/" + "c" * 64, "c" * 64),  # v1 + v2
    ("0::/user.slice/user-0.slice/session-3.scope\n", None),                      # no container
    ("0::/docker/abc\n", None),                                                   # not an id
])
def test_container_in_cgroup(cgroup, container):
    assert container_in_cgroup(cgroup) == container


async def test_gpu_memory_is_reported_per_replica_and_the_rest_as_unattributed(api,
                                                                              docker_client):
    nvml = ReplayNvml.load(FIXTURE)
    inventory = NvmlInventory(nvml)
    samples: dict = {}
    h, client = await api(gpus=list(inventory.gpus), gpu_samples=samples)
    await client.post("/v1/endpoints", headers=ADMIN, json=body("m", min_replicas=1, gpus=1))
    pool = h.reconciler.pool("m")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [replica] = pool.replicas.values()
    gpu = next(g for g in inventory.gpus if g.uuid == replica.gpus[0])
    pid = docker_client.containers.get(replica.container_id).attrs["State"]["Pid"]
    # NVML lists the model's process (a host PID inside the replica's container) and one of
    # this test's own (outside any container: someone using the GPU behind berth's back).
    nvml.devices[gpu.index]["processes"] = [{"pid": pid, "used_memory_mib": 20480},
                                            {"pid": os.getpid(), "used_memory_mib": 512}]
    samples.update(inventory.sample())
    view = await (await client.get("/v1/endpoints/m", headers=ADMIN)).json()
    assert view["replicas"][0]["gpu_memory_used_mib"] == {gpu.uuid: 20480}
    gpus = {g["uuid"]: g for g in (await (await client.get("/v1/gpus", headers=ADMIN)).json())
            ["gpus"]}
    assert gpus[gpu.uuid]["unattributed_mib"] == 512
    text = await (await client.get("/metrics", headers=ADMIN)).text()
    series = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    assert series[("berth_replica_gpu_memory_bytes", (("endpoint", "m"), ("gpu", str(gpu.index)),
                                                      ("replica", replica.id)))] == 20480 * MIB
    assert series[("berth_gpu_unattributed_memory_bytes", (
        ("gpu", str(gpu.index)), ("name", gpu.name), ("uuid", gpu.uuid)))] == 512 * MIB


def test_nvml_going_away_blames_no_gpu_and_comes_back_with_backoff():
    nvml, now = ReplayNvml.load(FIXTURE), [0.0]
    inventory = NvmlInventory(nvml, clock=lambda: now[0])
    assert len(inventory.sample()) == 4
    nvml.driver_gone()  # a driver upgrade: every call fails
    assert inventory.sample() == {} and not inventory.available
    assert inventory.lost == {}  # no GPU is blamed for NVML's absence
    now[0] = 6.0
    assert inventory.sample() == {} and inventory.retry_s == 10.0  # tried, backing off
    now[0] = 10.0
    assert inventory.sample() == {}  # not yet due: NVML is not even asked
    nvml.driver_gone(False)
    now[0] = 17.0
    assert len(inventory.sample()) == 4 and inventory.available  # back, same GPUs


def test_the_health_watch_registers_again_after_nvml_comes_back():
    # A driver upgrade: NVML goes away, the inventory re-initialises it, and event sets made
    # before no longer work. The watch must register again on fresh handles, or it would
    # never see an Xid after the upgrade.
    nvml, now = ReplayNvml.load(FIXTURE), [0.0]
    inventory = NvmlInventory(nvml, clock=lambda: now[0])
    reported: list[tuple[str, str]] = []
    seen = threading.Event()

    def report(uuid: str, reason: str) -> None:
        reported.append((uuid, reason))
        seen.set()

    watch = GpuHealthWatch(nvml, inventory.handles, report, wait_ms=20)
    watch.start()
    try:
        nvml.driver_gone()
        assert inventory.sample() == {} and not inventory.available
        time.sleep(0.1)  # the watch finds its wait failing and backs off
        nvml.driver_gone(False)
        now[0] = 6.0
        assert len(inventory.sample()) == 4  # re-initialised: the old event set is dead
        nvml.push({"device": 2, "type": "xid_critical", "xid": 79})
        assert seen.wait(5), "the watch never saw the Xid after NVML came back"
    finally:
        watch.stop()
    assert reported == [(inventory.gpus[2].uuid, reported[0][1])] and "79" in reported[0][1]


async def test_while_nvml_is_away_the_views_say_gpu_readings_are_unknown(api):
    nvml = ReplayNvml.load(FIXTURE)
    inventory = NvmlInventory(nvml)
    _, client = await api(gpus=list(inventory.gpus), gpu_readings=inventory.readings)
    health = await (await client.get("/healthz")).json()
    assert health["status"] == "ok" and "gpus" not in health
    nvml.driver_gone()
    assert inventory.sample() == {}
    health = await (await client.get("/healthz")).json()
    assert health["status"] == "ok"  # the replicas keep running
    assert health["gpus"].startswith("readings unknown since") and "NVML" in health["gpus"]
    gpus = (await (await client.get("/v1/gpus", headers=ADMIN)).json())["gpus"]
    assert {g["readings"] for g in gpus} == {"unknown"} and all(g["healthy"] for g in gpus)
