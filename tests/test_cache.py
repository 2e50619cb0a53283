"""Cache volumes: an endpoint's `cache_dir` is a named volume of its own, shared by its
replicas and kept across replica replacement; deleting the endpoint with purge_cache removes
it, without keeps it."""

from __future__ import annotations

import asyncio

import docker.errors
import pytest

from helpers import IMAGE, SESSION, TEST_LABEL, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
# The demo server, after noting which replica started, in the cache.
REMEMBER = ("import os, runpy; open('/cache/starts', 'a').write(os.environ['BERTH_REPLICA'] "
            "+ '\\n'); runpy.run_path('/srv/model_server.py', run_name='__main__')")


def spec(name: str, **fields: object) -> dict:
    return {"name": name, "image": IMAGE, "min_replicas": 1, "cache_dir": "/cache",
            "command": ["/usr/bin/python3.11", "-c", REMEMBER],
            "readiness": {"path": "/health", "period_s": 0.1},
            "labels": {TEST_LABEL: SESSION}, **fields}


async def test_a_cache_outlives_replicas_and_goes_only_when_purged(api, docker_client):
    h, client = await api()
    runtime = h.reconciler.runtime
    for name in ("kept", "purged"):
        resp = await client.post("/v1/endpoints", json=spec(name), headers=ADMIN)
        assert resp.status == 201, await resp.text()
    pool = h.reconciler.pool("purged")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [first] = pool.replicas.values()
    resp = await client.patch("/v1/endpoints/purged", json={"env": {"V": "2"}}, headers=ADMIN)
    assert resp.status == 200
    await wait_for(pool, lambda: ready_count(pool) == 1 and first.id not in pool.replicas,
                   what="a replacement", timeout=20)
    [second] = pool.replicas.values()
    out = docker_client.containers.get(second.container_id).exec_run(
        ["/usr/bin/python3.11", "-c", "print(open('/cache/starts').read())"])
    assert out.output.decode().split() == [first.id, second.id]  # the first one's write stayed
    view = await (await client.get("/v1/endpoints/purged", headers=ADMIN)).json()
    volume = runtime.cache_volume("purged")
    assert view["cache"]["volume"] == volume and view["cache"]["path"] == "/cache"
    assert view["cache"]["size_bytes"] is None or view["cache"]["size_bytes"] > 0
    assert docker_client.volumes.get(volume).attrs["Labels"]["berth.endpoint"] == "purged"
    for name, purge in (("kept", "false"), ("purged", "true")):
        resp = await client.delete(f"/v1/endpoints/{name}?purge_cache={purge}", headers=ADMIN)
        assert resp.status == 200
    for _ in range(100):
        if not h.reconciler.holds("kept") and not h.reconciler.holds("purged"):
            break
        await asyncio.sleep(0.1)
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(volume)
    kept = docker_client.volumes.get(runtime.cache_volume("kept"))  # left for a re-creation
    kept.remove()


async def test_a_cache_dir_must_be_an_absolute_path(api):
    _, client = await api()
    for bad in ("cache", "/a:b", "/with space"):
        resp = await client.post("/v1/endpoints", json=spec("x", cache_dir=bad), headers=ADMIN)
        assert resp.status == 422 and (await resp.json())["error"]["details"][0]["path"] == \
            "cache_dir", bad
