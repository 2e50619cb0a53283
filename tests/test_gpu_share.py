"""Replicas sharing one GPU by memory (`gpu_memory`) on a real engine: packed by reserved
memory, told their share (env and `${BERTH_...}` in args), never mixed with a whole-GPU
replica, and refused with a clear message when they can never fit."""

from __future__ import annotations

from berth.daemon.config import ConfigError, parse_config
from build_image import PYTHON
from helpers import body, endpoint, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}


async def test_two_endpoints_share_one_gpu_and_a_whole_gpu_replica_never_joins(api,
                                                                             docker_client):
    h, client = await api(gpus=2)  # two 1024 MiB GPUs, 128 MiB reserved on each
    for name in ("a", "b"):
        resp = await client.post("/v1/endpoints", headers=ADMIN, json=body(
            name, min_replicas=1, gpus=1, gpu_memory="400m",
            args=[PYTHON, "-u", "/srv/model_server.py", "--share=${BERTH_GPU_MEMORY_FRACTION}"]))
        assert resp.status == 201, await resp.text()
    for name in ("a", "b"):
        pool = h.reconciler.pool(name)
        await wait_for(pool, lambda p=pool: ready_count(p) == 1, what=f"{name} ready")
    [ra] = h.reconciler.pool("a").replicas.values()
    [rb] = h.reconciler.pool("b").replicas.values()
    assert ra.gpus == rb.gpus  # packed onto one GPU: the other stays whole for others
    env = await (await client.get("/invoke/a/env", headers=ADMIN)).json()
    assert env["BERTH_GPU_MEMORY_MIB"] == "400" and env["BERTH_GPU_MEMORY_FRACTION"] == "0.390"
    args = docker_client.containers.get(ra.container_id).attrs["Args"]
    assert args[-1] == "--share=0.390"
    # A whole-GPU replica gets the other GPU; a third share finds no room left anywhere.
    await client.post("/v1/endpoints", headers=ADMIN, json=body("w", min_replicas=1, gpus=1))
    await client.post("/v1/endpoints", headers=ADMIN,
                      json=body("c", min_replicas=1, gpus=1, gpu_memory="400m"))
    whole = h.reconciler.pool("w")
    await wait_for(whole, lambda: ready_count(whole) == 1, what="whole-GPU replica ready")
    [rw] = whole.replicas.values()
    assert rw.gpus != ra.gpus
    [rc] = h.reconciler.pool("c").replicas.values()
    assert rc.state.value == "pending" and not rc.gpus
    view = {g["index"]: g for g in
            (await (await client.get("/v1/gpus", headers=ADMIN)).json())["gpus"]}
    shared = next(g for g in view.values() if g["shares"])
    assert shared["shared_mib"] == 800 and shared["replica"] is None
    assert sorted(s["endpoint"] for s in shared["shares"]) == ["a", "b"]
    # When a sharer goes, the pending one takes its room.
    await client.delete("/v1/endpoints/a", headers=ADMIN)
    pool_c = h.reconciler.pool("c")
    await wait_for(pool_c, lambda: ready_count(pool_c) == 1, what="c ready in a's room")
    assert rc.gpus == rb.gpus


async def test_shares_that_can_never_fit_are_refused_by_path(api):
    _, client = await api(gpus=1)
    resp = await client.post("/v1/endpoints", headers=ADMIN,
                             json=body("big", gpus=1, gpu_memory="2g"))
    error = (await resp.json())["error"]
    assert resp.status == 422 and error["details"][0]["path"] == "gpu_memory"
    assert "896 MiB beside gpu.reserve_memory" in error["message"]
    resp = await client.post("/v1/endpoints", headers=ADMIN,
                             json=body("two", gpus=2, gpu_memory="100m"))
    error = (await resp.json())["error"]
    assert resp.status == 422 and "use it with gpus = 1" in error["message"]


def test_config_check_names_bad_shares():
    base = {"gpu": {"source": "static", "reserve_memory": "1g",
                    "devices": [{"name": "A10", "memory_mib": 24576}]}}
    for fields, path, text in (
            ({"image": "x", "gpus": 2, "gpu_memory": "4g"}, "endpoints.e.gpu_memory",
             "use it with gpus = 1"),
            ({"image": "x", "gpus": 1, "gpu_memory": "lots"}, "endpoints.e.gpu_memory",
             "is not a size")):
        try:
            parse_config({**base, "endpoints": {"e": fields}})
        except ConfigError as exc:
            assert [i.path for i in exc.issues] == [path] and text in str(exc)
        else:
            raise AssertionError(f"{fields} was accepted")
    try:
        parse_config({**base, "gpu": {**base["gpu"], "reserve_memory": "1x"}})
    except ConfigError as exc:
        assert [i.path for i in exc.issues] == ["gpu.reserve_memory"]
    else:
        raise AssertionError("a bad reserve_memory was accepted")


async def test_cordon_drains_every_sharer_of_the_gpu(api):
    h, client = await api(gpus=2)
    for name in ("a", "b"):
        await client.post("/v1/endpoints", headers=ADMIN,
                          json=body(name, min_replicas=1, gpus=1, gpu_memory="300m"))
    pools = [h.reconciler.pool(n) for n in ("a", "b")]
    for pool in pools:
        await wait_for(pool, lambda p=pool: ready_count(p) == 1, what="sharer ready")
    firsts = [next(iter(p.replicas.values())) for p in pools]
    shared = firsts[0].gpus[0]
    assert firsts[1].gpus == [shared]
    assert (await client.post(f"/v1/gpus/{shared}/cordon", headers=ADMIN)).status == 200
    for pool, first in zip(pools, firsts, strict=True):
        await wait_for(pool, lambda p=pool, f=first: f.state.value == "stopped"
                       and ready_count(p) == 1, what="sharer moved")
    assert all(r.gpus != [shared] for p in pools for r in p.replicas.values()
               if r.state.value == "ready")


async def test_a_restart_frees_shares_of_gone_replicas_and_adopts_sleepers(harness,
                                                                         docker_client):
    h = await harness(gpus=2)
    await h.reconciler.apply_specs({
        "s": endpoint("s", min_replicas=1, gpus=1, gpu_memory="300m"),
        "z": endpoint("z", min_replicas=1, gpus=1, idle_timeout_s=60,
                      sleep={"after_s": 0.2, "wake_timeout_s": 5})}, "config")
    ps, pz = h.reconciler.pool("s"), h.reconciler.pool("z")
    await wait_for(ps, lambda: ready_count(ps) == 1, what="sharer ready")
    [sleeper] = pz.replicas.values()
    await wait_for(pz, lambda: sleeper.state.value == "sleeping", what="asleep")
    [sharer] = ps.replicas.values()
    await h.stop(stop_replicas=False)
    docker_client.containers.get(sharer.container_id).remove(force=True)  # died meanwhile
    h2 = await harness(gpus=2)
    pz2 = h2.reconciler.pool("z")
    [again] = [r for r in pz2.replicas.values() if r.id == sleeper.id]
    assert again.state.value == "sleeping" and again.container_id == sleeper.container_id
    assert sharer.id not in {r for s in h2.reconciler.allocator.shares().values() for r in s}
    assert sharer.id not in {r for _, r, _ in await h2.store.gpu_shares()}
