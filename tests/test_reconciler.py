"""The reconciler against a real Docker engine and a real SQLite store."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from berth.scheduler.replica import ReplicaState
from helpers import (
    SESSION,
    TEST_LABEL,
    SlowCreates,
    containers,
    endpoint,
    ready_count,
    wait_for,
)

S = ReplicaState


async def get_json(address: str, path: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"http://{address}{path}") as r:
        return await r.json()


async def test_min_replicas_run_with_labels_env_and_gpus(harness, docker_client):
    h = await harness(gpus=2)
    rec = h.reconciler
    await rec.apply_specs({"echo": endpoint("echo", gpus=1, min_replicas=1)}, "config")
    pool = rec.pool("echo")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="one ready replica")
    replica = next(iter(pool.replicas.values()))
    container = docker_client.containers.get(replica.container_id)
    labels = container.labels
    assert labels["berth.endpoint"] == "echo"
    assert labels["berth.replica"] == replica.id
    assert labels["berth.managed"] == "true"
    assert list(container.attrs["NetworkSettings"]["Networks"]) == [f"{h.network}-echo"]
    assert container.attrs["HostConfig"]["PortBindings"] in (None, {})  # nothing published
    env = await get_json(replica.address, "/env")
    assert env["BERTH_ENDPOINT"] == "echo"
    assert env["BERTH_REPLICA"] == replica.id
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-test-0"
    assert rec.allocator.owners() == {"GPU-test-0": replica.id}
    stored = {r.id: r for r in await h.store.replicas()}
    assert stored[replica.id].state == "ready"
    assert stored[replica.id].container_id == replica.container_id
    assert stored[replica.id].gpus == ["GPU-test-0"]
    kinds = [e.kind for e in await h.store.events("echo")]
    assert kinds[:4] == ["endpoint_created", "scale_up", "start", "ready"]


async def test_spec_fields_reach_the_container(harness, docker_client, tmp_path):
    h = await harness()
    await h.store.put_secret("HF_TOKEN", "s3cret")
    data = tmp_path / "models"
    data.mkdir()
    (data / "weights.bin").write_text("w")
    spec = endpoint(
        "fields", min_replicas=1, port=9000, env={"PORT": "9000", "MODE": "test"},
        command=["/usr/bin/python3.11"], args=["-u", "/srv/model_server.py"],
        secrets=["HF_TOKEN"], volumes=[f"{data}:/models:ro"], shm_size="64m", cpus=0.5,
        memory="256m")
    await h.reconciler.apply_specs({"fields": spec}, "config")
    pool = h.reconciler.pool("fields")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready on port 9000")
    replica = next(iter(pool.replicas.values()))
    assert replica.address.endswith(":9000")
    env = await get_json(replica.address, "/env")
    assert env["MODE"] == "test"
    assert env["HF_TOKEN"] == "s3cret"
    attrs = docker_client.containers.get(replica.container_id).attrs
    host = attrs["HostConfig"]
    assert attrs["Config"]["Entrypoint"] == ["/usr/bin/python3.11"]
    assert attrs["Config"]["Cmd"] == ["-u", "/srv/model_server.py"]
    assert host["ShmSize"] == 64 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 256 * 1024 * 1024
    assert f"{data}:/models:ro" in host["Binds"]


async def test_crashing_replica_is_replaced_with_backoff_and_frees_gpus(harness, docker_client):
    h = await harness(gpus=1)
    rec = h.reconciler
    spec = endpoint("crashy", gpus=1, min_replicas=1, env={"MODEL_CRASH_AFTER_S": "0.3"})
    await rec.apply_specs({"crashy": spec}, "config")
    pool = rec.pool("crashy")
    await wait_for(pool, lambda: pool.failures >= 2, timeout=20, what="two failures")
    failed = [r for r in await h.store.replicas() if r.state == "failed"]
    assert len(failed) >= 2
    assert all("container exited" in (r.reason or "") for r in failed)
    assert [r.failures for r in failed[:2]] == [1, 2]
    # The replacement waited out the backoff: 1 s after the first failure.
    second = sorted(await h.store.replicas(), key=lambda r: r.created_at)[1]
    assert second.created_at - failed[0].stopped_at >= 0.9
    # Failed containers are removed, not left to pile up; the GPU is held by at most the live one.
    # (A sparse list: berth may remove a container between a list and a per-container inspect.)
    left = containers(docker_client, label="berth.endpoint=crashy")
    assert {c.attrs["Labels"]["berth.replica"] for c in left} <= set(pool.replicas)
    assert set(rec.allocator.owners().values()) <= set(pool.replicas)
    assert "logs" in [e.kind for e in await h.store.events("crashy")]


async def test_startup_timeout_fails_the_replica(harness, docker_client):
    h = await harness()
    spec = endpoint("slow", min_replicas=1, startup_timeout_s=0.6,
                    env={"MODEL_FAIL_HEALTH": "1"})
    await h.reconciler.apply_specs({"slow": spec}, "config")
    pool = h.reconciler.pool("slow")
    await wait_for(pool, lambda: pool.failures >= 1, what="startup timeout")
    failed = next(r for r in await h.store.replicas() if r.state == "failed")
    assert "not ready within startup_timeout_s=0.6" in failed.reason
    await asyncio.sleep(0.2)
    assert not containers(docker_client, id=failed.container_id)


async def test_failed_liveness_replaces_the_replica(harness):
    h = await harness()
    await h.reconciler.apply_specs({"live": endpoint("live", min_replicas=1)}, "config")
    pool = h.reconciler.pool("live")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    first = next(iter(pool.replicas.values()))
    async with aiohttp.ClientSession() as s:
        await s.post(f"http://{first.address}/fail-health")
    await wait_for(pool, lambda: first.state is S.FAILED, what="liveness failure")
    assert "liveness failed 2 times" in first.reason
    await wait_for(pool, lambda: ready_count(pool) == 1, timeout=20, what="a replacement")
    assert first.id not in pool.replicas


async def test_a_model_that_exits_is_failed_as_exited_when_liveness_notices_first(
        harness, docker_client):
    h = await harness()
    await h.reconciler.apply_specs({"gone": endpoint("gone", min_replicas=1)}, "config")
    pool = h.reconciler.pool("gone")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    replica = next(iter(pool.replicas.values()))
    h.pause_passes()  # only the liveness probe can see the exit now
    docker_client.api.kill(replica.container_id)
    await wait_for(pool, lambda: replica.state is S.FAILED, what="the exit noticed")
    assert "container exited (exited with code 137); liveness failed 2 times" in replica.reason


async def test_missing_image_is_an_endpoint_error_and_others_keep_running(harness):
    h = await harness()
    specs = {"good": endpoint("good", min_replicas=1),
             "bad": endpoint("bad", min_replicas=1, image="berth-test/missing:never")}
    await h.reconciler.apply_specs(specs, "config")
    good, bad = h.reconciler.pool("good"), h.reconciler.pool("bad")
    await wait_for(bad, lambda: bad.error is not None, what="image error")
    assert "berth-test/missing:never" in bad.error
    assert bad.status() == "error"
    await wait_for(good, lambda: ready_count(good) == 1, what="good endpoint ready")
    stored = {e.name: e for e in await h.store.endpoints()}
    assert "missing:never" in stored["bad"].error


async def test_restart_adopts_running_containers_and_rebuilds_gpu_owners(harness):
    first = await harness(gpus=2)
    await first.reconciler.apply_specs({"keep": endpoint("keep", gpus=1, min_replicas=1)},
                                       "config")
    pool = first.reconciler.pool("keep")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    replica = next(iter(pool.replicas.values()))
    await first.stop(stop_replicas=False)

    second = await harness(gpus=2)
    await second.reconciler.apply_specs({"keep": endpoint("keep", gpus=1, min_replicas=1)},
                                        "config")
    pool2 = second.reconciler.pool("keep")
    adopted = pool2.replicas[replica.id]
    assert adopted.container_id == replica.container_id
    assert adopted.state is S.READY
    assert second.reconciler.allocator.owners() == {"GPU-test-0": replica.id}
    await asyncio.sleep(0.5)  # a few passes: nothing is restarted
    assert list(pool2.replicas) == [replica.id]
    assert "adopt" in [e.kind for e in await second.store.events("keep")]


async def test_restart_removes_unknown_containers_and_forgets_gone_ones(
        harness, docker_client, model_image, network):
    first = await harness(gpus=1)
    await first.reconciler.apply_specs({"gone": endpoint("gone", gpus=1, min_replicas=1)},
                                       "config")
    pool = first.reconciler.pool("gone")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    replica = next(iter(pool.replicas.values()))
    await first.stop(stop_replicas=False)
    docker_client.containers.get(replica.container_id).remove(force=True)  # died while down
    stray = docker_client.containers.run(
        model_image, detach=True, network=network,
        labels={"berth.managed": "true", "berth.endpoint": "gone",
                "berth.replica": "gone-stray0", "berth.instance": network,
                TEST_LABEL: SESSION})

    second = await harness(gpus=1)
    assert not containers(docker_client, id=stray.id)
    stored = {r.id: r for r in await second.store.replicas()}
    assert stored[replica.id].state == "stopped"
    assert second.reconciler.allocator.owners() == {}  # its GPU is free again


async def test_changed_image_rolls_new_ready_before_old_stops(harness):
    h = await harness()
    rec = h.reconciler
    await rec.apply_specs({"roll": endpoint("roll", min_replicas=1)}, "config")
    pool = rec.pool("roll")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="first ready")
    old = next(iter(pool.replicas.values()))
    summary = await rec.apply_specs(
        {"roll": endpoint("roll", min_replicas=1, env={"VERSION": "2"})}, "config")
    assert summary.rolled == ["roll"]
    await wait_for(pool, lambda: old.state is S.STOPPED, what="old replica stopped")
    new = next(iter(pool.replicas.values()))
    assert new.generation == old.generation + 1 and new.state is S.READY
    events = await h.store.events("roll")
    new_ready = next(e.ts for e in events if e.replica == new.id and e.kind == "ready")
    old_drain = next(e.ts for e in events if e.replica == old.id and e.kind == "drain")
    assert new_ready <= old_drain
    assert (await get_json(new.address, "/env"))["VERSION"] == "2"


async def test_changed_limits_apply_without_replacing_replicas(harness):
    h = await harness()
    rec = h.reconciler
    await rec.apply_specs({"inplace": endpoint("inplace", min_replicas=1)}, "config")
    pool = rec.pool("inplace")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    first = next(iter(pool.replicas.values()))
    summary = await rec.apply_specs(
        {"inplace": endpoint("inplace", min_replicas=2, max_replicas=3,
                             request_timeout_s=5.0)}, "config")
    assert summary.updated == ["inplace"]
    await wait_for(pool, lambda: ready_count(pool) == 2, what="second replica")
    assert first.id in pool.replicas and first.state is S.READY
    assert pool.generation == first.generation


async def test_removed_endpoint_stops_its_replicas_and_frees_gpus(harness, docker_client):
    h = await harness(gpus=1)
    rec = h.reconciler
    await rec.apply_specs({"bye": endpoint("bye", gpus=1, min_replicas=1)}, "config")
    pool = rec.pool("bye")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    replica = next(iter(pool.replicas.values()))
    summary = await rec.apply_specs({}, "config")
    assert summary.removed == ["bye"]
    await wait_for(pool, lambda: replica.state is S.STOPPED, what="stopped")
    for _ in range(20):
        if not rec.holds("bye"):
            break
        await asyncio.sleep(0.1)
    assert not rec.holds("bye")
    assert rec.allocator.owners() == {}
    assert not containers(docker_client, id=replica.container_id)
    assert "bye" not in [e.name for e in await h.store.endpoints()]


async def removed_mid_create(harness):
    """One GPU; endpoint "slow" removed while the engine (SlowCreates) creates its replica's
    container, a few reconcile passes ago: (harness, creates, pool, replica)."""
    h = await harness(gpus=1)
    creates = SlowCreates(h.runtime)
    await h.reconciler.apply_specs({"slow": endpoint("slow", gpus=1, min_replicas=1)},
                                   "config")
    assert await creates.entered()
    pool = h.reconciler.pool("slow")
    (replica,) = pool.replicas.values()
    await h.reconciler.apply_specs({}, "config")
    await asyncio.sleep(0.3)  # (a few reconcile passes)
    return h, creates, pool, replica


async def test_a_replica_removed_while_its_container_is_created_holds_its_gpus_until_removed(
        harness, docker_client):
    # The engine creates a container in the runtime's thread, which no cancel stops. A stop
    # landing then used to free the GPUs at once (no container id yet) while the container
    # came up with them: two replicas on one GPU.
    h, creates, pool, replica = await removed_mid_create(harness)
    rec = h.reconciler
    assert list(rec.allocator.owners().values()) == [replica.id]  # held: the create goes on
    assert rec.holds("slow")
    creates.go_on.set()
    await wait_for(pool, lambda: not rec.holds("slow"), what="stopped and forgotten")
    assert rec.allocator.owners() == {}
    assert not containers(docker_client, name=f"berth-{replica.id}")


async def test_a_stop_cut_short_by_shutdown_leaves_the_create_to_the_stop_that_follows(
        harness, docker_client):
    # berthd stopping cancels a stop that waits for a container's create; the shutdown's own
    # stop of every replica must wait for that create too (the first stop used to forget it),
    # else it frees the GPUs and the container comes up after berthd is gone.
    h, creates, _, replica = await removed_mid_create(harness)  # its stop waits for the create
    shutdown = asyncio.create_task(h.stop(stop_replicas=True))  # cancels it, stops again
    await asyncio.sleep(0.5)
    assert not shutdown.done()  # the stop that follows waits for the create as well
    creates.go_on.set()
    await shutdown
    assert not containers(docker_client, name=f"berth-{replica.id}")


async def test_replica_waits_pending_while_gpus_are_taken(harness):
    h = await harness(gpus=1)
    rec = h.reconciler
    await rec.apply_specs({"a": endpoint("a", gpus=1, min_replicas=1, priority=5)}, "config")
    await wait_for(rec.pool("a"), lambda: ready_count(rec.pool("a")) == 1, what="a ready")
    await rec.apply_specs({"a": endpoint("a", gpus=1, min_replicas=1, priority=5),
                           "b": endpoint("b", gpus=1, min_replicas=1)}, "config")
    await asyncio.sleep(0.5)
    b = rec.pool("b")
    assert [r.state for r in b.replicas.values()] == [S.PENDING]
    assert b.status() == "pending"
    # When a's replica goes away, b gets the GPU.
    await rec.apply_specs({"b": endpoint("b", gpus=1, min_replicas=1)}, "config")
    await wait_for(b, lambda: ready_count(b) == 1, what="b ready on the freed GPU")
    assert list(rec.allocator.owners().values()) == list(b.replicas)


async def test_failed_container_start_never_leaks_its_gpus(harness, docker_client):
    h = await harness(gpus=1, gpu_mode="nvidia")  # this engine has no NVIDIA runtime
    if "nvidia" in h.runtime.runtimes:
        pytest.skip("this engine has the NVIDIA runtime: the refusal cannot happen here")
    rec = h.reconciler
    await rec.apply_specs({"nogpu": endpoint("nogpu", gpus=1, min_replicas=1)}, "config")
    pool = rec.pool("nogpu")
    await wait_for(pool, lambda: pool.failures >= 1 and not pool.count(S.FAILED),
                   what="refused start, cleaned up")
    assert "could not select device driver" in pool.error
    assert rec.allocator.owners() == {}
    assert await h.store.gpu_owners() == {}
    assert not containers(docker_client, label="berth.endpoint=nogpu")


async def test_missing_secret_is_an_endpoint_error_naming_it(harness):
    h = await harness()
    await h.reconciler.apply_specs(
        {"sec": endpoint("sec", min_replicas=1, secrets=["HF_TOKEN", "OTHER"])}, "config")
    pool = h.reconciler.pool("sec")
    await h.store.put_secret("OTHER", "x")
    await wait_for(pool, lambda: pool.error is not None, what="secret error")
    assert pool.error == "secret HF_TOKEN is not stored"


async def test_a_container_list_older_than_a_start_never_fails_that_replica(harness):
    # CI saw it: a pass listed the containers while a replica's container was still being
    # created, the replica then reached starting, and the stale list ("Created") failed it.
    h = await harness()
    real_run, real_list = h.runtime.run, h.runtime.list_managed
    listed = asyncio.Event()
    pool_box: list = []

    async def run_after_listing(spec):
        await listed.wait()  # the container comes to be only after the list was taken
        return await real_run(spec)

    async def stale_list():
        rows = await real_list()
        pool = pool_box[0] if pool_box else None
        if pool and not listed.is_set() and any(
                r.state is S.PENDING for r in pool.replicas.values()):
            listed.set()
            await wait_for(pool, lambda: any(r.state is not S.PENDING
                                             for r in pool.replicas.values()), what="a start")
        return rows

    h.runtime.run, h.runtime.list_managed = run_after_listing, stale_list
    await h.reconciler.apply_specs({"race": endpoint("race", min_replicas=1)}, "config")
    pool = h.reconciler.pool("race")
    pool_box.append(pool)
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    assert listed.is_set()  # the stale list was really handed to a pass
    assert pool.failures == 0
    assert "crash" not in [e.kind for e in await h.store.events("race")]


async def test_engine_errors_and_timeouts_leave_state_consistent(harness, docker_client):
    # The engine answering errors or too slowly, injected at the SDK's lowest layer (the real
    # runtime, reconciler and engine around it): nothing is failed for it, and a GPU is freed
    # only once its container is known gone.
    import docker
    import requests

    h = await harness(gpus=1)
    rec = h.reconciler
    await rec.apply_specs({"e": endpoint("e", gpus=1, min_replicas=1)}, "config")
    pool = rec.pool("e")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [replica] = pool.replicas.values()
    api = h.runtime.client.api
    real_list, real_remove = api.containers, api.remove_container
    faults = {"list": [requests.exceptions.ReadTimeout("injected: read timed out"),
                       docker.errors.APIError("500 Server Error: injected"),
                       requests.exceptions.ReadTimeout("injected: read timed out")],
              "remove": [docker.errors.APIError("500 Server Error: injected")] * 3}

    def faulty(kind, real):
        def call(*args, **kwargs):
            if faults[kind]:
                raise faults[kind].pop(0)
            return real(*args, **kwargs)
        return call

    api.containers = faulty("list", real_list)
    for _ in range(100):  # passes run every 0.1 s
        if not faults["list"]:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a pass or two after the last fault
    assert not faults["list"] and replica.state is S.READY and list(pool.replicas) == [replica.id]
    assert h.runtime.engine_up

    api.remove_container = faulty("remove", real_remove)
    await rec.apply_specs({}, "config")  # the endpoint goes: its replica must be removed
    for _ in range(100):
        if len(faults["remove"]) < 3:
            break
        await asyncio.sleep(0.05)
    # The engine refused the removal: the container is still there, so is the GPU's owner.
    assert docker_client.containers.get(replica.container_id)
    assert set(rec.allocator.owners().values()) == {replica.id}
    for _ in range(100):  # later passes try again until the engine complies
        if not rec.holds("e"):
            break
        await asyncio.sleep(0.1)
    assert not rec.holds("e") and not faults["remove"]
    assert rec.allocator.owners() == {}
    assert not containers(docker_client, id=replica.container_id)
