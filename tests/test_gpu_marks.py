"""GPUs out of service: cordon / uncordon over the API (kept across restarts, replicas move to
another GPU with no failed call), unhealthy marks, and what the API, /metrics and the audit
log say of them."""

from __future__ import annotations

import asyncio

from berth.gpu import GpuMarkKind
from berth.scheduler.replica import ReplicaState
from helpers import CallsInFlight, body, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
S = ReplicaState


async def gpus(client) -> list[dict]:
    return (await (await client.get("/v1/gpus", headers=ADMIN)).json())["gpus"]


async def test_cordon_moves_replicas_and_survives_a_restart(api):
    h, client = await api(gpus=2)
    await client.post("/v1/endpoints", headers=ADMIN, json=body("c", min_replicas=1, gpus=1))
    pool = h.reconciler.pool("c")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [first] = pool.replicas.values()
    [held] = first.gpus
    async with CallsInFlight(client, "/invoke/c/sleep?s=0.05", 2, ADMIN) as calls:
        await asyncio.sleep(0.2)
        resp = await client.post(f"/v1/gpus/{held}/cordon", headers=ADMIN,
                                 json={"reason": "fan noise"})
        view = await resp.json()
        assert resp.status == 200 and view["cordoned"] and view["cordon_reason"] == "fan noise"
        await wait_for(pool, lambda: first.state is S.STOPPED, what="replica moved off the GPU")
        await wait_for(pool, lambda: ready_count(pool) == 1, what="replacement ready")
    statuses = calls.statuses
    [second] = [r for r in pool.replicas.values() if r.state is S.READY]
    assert second.gpus != [held] and len(second.gpus) == 1
    assert set(statuses) == {200} and len(statuses) > 5  # queued while it moved, none lost
    text = await (await client.get("/metrics", headers=ADMIN)).text()
    assert any(line.startswith("berth_gpu_cordoned{") and held in line and line.endswith(" 1.0")
               for line in text.splitlines())
    # Kept across a restart: a new allocator over the same store still keeps the GPU out.
    await h.reconciler.allocator.load()
    assert GpuMarkKind.CORDONED in h.reconciler.allocator.marks(held)
    assert await h.reconciler.allocator.allocate("x", 2, None) is None  # only one usable
    resp = await client.post("/v1/gpus/0/uncordon", headers=ADMIN)  # by index works too
    by_index = {g["index"]: g for g in await gpus(client)}
    assert resp.status == 200 and not any(g["cordoned"] for g in by_index.values())
    assert (await client.post(f"/v1/gpus/{held}/uncordon", headers=ADMIN)).status == 200
    kinds = [e.kind for e in await h.store.events()]
    assert kinds.count("gpu_cordoned") == 1 and kinds.count("gpu_uncordoned") == 1
    audit = (await (await client.get("/v1/audit", headers=ADMIN)).json())["audit"]
    assert [(a["action"], a["target"]) for a in audit if a["action"].startswith("gpu.")] == [
        ("gpu.cordon", held), ("gpu.uncordon", by_index[0]["uuid"]), ("gpu.uncordon", held)]


async def test_cordon_refusals(api):
    _, client = await api(gpus=1)
    resp = await client.post("/v1/gpus/GPU-nope/cordon", headers=ADMIN)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "gpu_not_found"
    resp = await client.post("/v1/gpus/0/cordon", headers=ADMIN, json={"reason": ""})
    assert resp.status == 422 and (await resp.json())["error"]["details"][0]["path"] == "reason"
    resp = await client.post("/v1/gpus/0/cordon", headers=ADMIN, json={"why": "x"})
    assert resp.status == 422
    assert (await client.post("/v1/gpus/0/cordon")).status == 401
    resp = await client.post("/v1/gpus/0/cordon", headers=ADMIN)  # no body: a default reason
    assert resp.status == 200 and (await resp.json())["cordon_reason"]


async def test_an_unhealthy_gpu_gets_no_replica_and_says_so(api):
    h, client = await api(gpus=1)
    [gpu] = h.reconciler.allocator.gpus
    await h.reconciler.mark_gpu(gpu.uuid, GpuMarkKind.UNHEALTHY, "Xid 79: fell off the bus")
    await client.post("/v1/endpoints", headers=ADMIN, json=body("u", min_replicas=1, gpus=1))
    pool = h.reconciler.pool("u")
    await asyncio.sleep(0.5)
    assert [r.state for r in pool.replicas.values()] == [S.PENDING]  # waits for a GPU
    [view] = await gpus(client)
    assert view["healthy"] is False and view["health_reason"] == "Xid 79: fell off the bus"
    text = await (await client.get("/metrics", headers=ADMIN)).text()
    assert any(line.startswith("berth_gpu_healthy{") and line.endswith(" 0.0")
               for line in text.splitlines())
    assert await h.reconciler.unmark_gpu(gpu.uuid, GpuMarkKind.UNHEALTHY)
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready once healthy again")
