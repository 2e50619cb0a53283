"""The control API in-process over real HTTP, with real replicas: endpoints, auth, secrets,
logs, events."""

from __future__ import annotations

import asyncio

import pytest

from berth.scheduler.replica import ReplicaState
from helpers import CallsInFlight, body, containers, endpoint, ready_count, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
S = ReplicaState


async def test_endpoint_lifecycle_through_the_api(api, docker_client):
    h, client = await api(gpus=1)
    resp = await client.post("/v1/endpoints", json=body("m", min_replicas=1, gpus=1),
                             headers=ADMIN)
    assert resp.status == 201 and (await resp.json())["source"] == "api"
    assert (await client.post("/v1/endpoints", json=body("m"), headers=ADMIN)).status == 409
    pool = h.reconciler.pool("m")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [first] = pool.replicas.values()
    resp = await client.patch("/v1/endpoints/m", json={"max_replicas": 3,
                                                        "readiness": {"period_s": 0.2}},
                              headers=ADMIN)
    spec = (await resp.json())["spec"]
    assert resp.status == 200 and spec["max_replicas"] == 3
    assert spec["readiness"] == {"path": "/health", "period_s": 0.2, "timeout_s": 0.5}
    # readiness is part of what a replica runs, so that rolled; a pure limit change does not:
    await wait_for(pool, lambda: first.state is S.STOPPED, what="rolled by readiness change")
    [second] = [r for r in pool.replicas.values() if r.state is not S.STOPPED]
    await wait_for(pool, lambda: second.state is S.READY, what="second ready")
    resp = await client.patch("/v1/endpoints/m", json={"idle_timeout_s": 99}, headers=ADMIN)
    assert resp.status == 200
    await asyncio.sleep(0.3)
    assert list(pool.replicas) == [second.id] and second.state is S.READY
    resp = await client.put("/v1/endpoints/m", json=body("m", min_replicas=1, gpus=1),
                            headers=ADMIN)
    assert resp.status == 200
    # DELETE: replicas drain and stop, GPUs free, queued tasks end cancelled.
    task = await (await client.post("/async/m/sleep?s=5", headers=ADMIN)).json()
    queued = await (await client.post("/async/m/echo", headers=ADMIN)).json()
    resp = await client.delete("/v1/endpoints/m", headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["deleted"] is True
    for _ in range(100):
        if not h.reconciler.holds("m"):
            break
        await asyncio.sleep(0.1)
    assert not h.reconciler.holds("m") and h.reconciler.allocator.owners() == {}
    assert (await client.get("/v1/endpoints/m", headers=ADMIN)).status == 404
    for _ in range(50):
        states = {t.id: t.status for t in await h.store.tasks.find()}
        if states[queued["id"]] == "cancelled":
            break
        await asyncio.sleep(0.1)
    assert states[queued["id"]] == "cancelled" and task["id"] in states
    assert not containers(docker_client, label="berth.endpoint=m")


async def test_bad_bodies_get_422_naming_every_wrong_field(api):
    _, client = await api()
    resp = await client.post("/v1/endpoints", headers=ADMIN, json={
        "name": "Bad_Name", "image": 5, "gpus": -1, "bogus": 1, "readiness": {"path": "x"}})
    assert resp.status == 422
    error = (await resp.json())["error"]
    paths = {d["path"] for d in error["details"]}
    assert paths == {"name", "image", "gpus", "bogus", "readiness.path"}
    assert "bogus: unknown key" in error["message"]
    resp = await client.post("/v1/endpoints", headers=ADMIN,
                             json={"name": "a", "image": "x", "min_replicas": 3})
    assert (await resp.json())["error"]["details"][0]["path"] == "min_replicas"
    resp = await client.post("/v1/endpoints", headers=ADMIN, json={"name": "g", "image": "x",
                                                                    "gpus": 2})
    assert (await resp.json())["error"]["details"] == [
        {"path": "gpus", "message": "asks for 2 but this box has 0 GPUs"}]
    resp = await client.post("/v1/endpoints", data=b"{not json",
                             headers={**ADMIN, "Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_json"
    resp = await client.put("/v1/endpoints/a", headers=ADMIN, json={"name": "b", "image": "x"})
    assert resp.status == 422
    assert (await client.patch("/v1/endpoints/none", headers=ADMIN, json={})).status == 404


@pytest.mark.parametrize("charset", ["nope", "hex", "utf-8"])
async def test_a_json_body_with_any_charset_is_read_as_json_not_a_500(api, charset):
    _h, client = await api()
    resp = await client.put("/v1/secrets/CHARSET_TEST", headers={
        **ADMIN, "Content-Type": f"application/json; charset={charset}"},
        data=b'{"value": "v"}')
    assert resp.status == 200, await resp.text()
    resp = await client.put("/v1/secrets/CHARSET_TEST", headers={
        **ADMIN, "Content-Type": f"application/json; charset={charset}"}, data=b"\xff{")
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_json"


async def test_config_owned_endpoints_refuse_api_writes(api):
    _, client = await api({"filed": endpoint("filed")})
    for method, data in (("put", body("filed")), ("patch", {"max_replicas": 2}),
                         ("delete", None)):
        resp = await getattr(client, method)("/v1/endpoints/filed", json=data, headers=ADMIN)
        error = (await resp.json())["error"]
        assert resp.status == 409 and error["code"] == "owned_by_config"
        assert "config file" in error["message"]


async def test_auth_cases(api):
    h, client = await api()
    for name, public in (("priv", False), ("other", False), ("pub", True)):
        resp = await client.post("/v1/endpoints", headers=ADMIN,
                                 json=body(name, min_replicas=1, public=public))
        assert resp.status == 201
    for name in ("priv", "other", "pub"):
        pool = h.reconciler.pool(name)
        await wait_for(pool, lambda pool=pool: ready_count(pool) == 1, what=f"{name} ready")
    mine = await (await client.post("/v1/endpoints/priv/tokens", headers=ADMIN)).json()
    theirs = await (await client.post("/v1/endpoints/other/tokens", headers=ADMIN)).json()
    assert set(mine) == {"id", "token", "endpoint", "created_at", "requests_per_minute",
                         "tokens_per_day"} and len(mine["token"]) >= 40

    async def call(headers: dict) -> int:
        return (await client.get("/invoke/priv/echo", headers=headers)).status

    assert await call({}) == 401
    assert await call({"Authorization": "Basic xyz"}) == 401
    assert await call({"Authorization": "Bearer wrong"}) == 401
    assert await call({"Authorization": f"Bearer {theirs['token']}"}) == 403
    assert await call({"Authorization": f"Bearer {mine['token']}"}) == 200
    assert await call(ADMIN) == 200
    assert (await client.get("/invoke/pub/echo")).status == 200
    # Task URLs answer to the task's endpoint token or the admin token only.
    mine_h = {"Authorization": f"Bearer {mine['token']}"}
    theirs_h = {"Authorization": f"Bearer {theirs['token']}"}
    assert (await client.post("/async/priv/echo", headers=theirs_h)).status == 403
    resp = await client.post("/async/priv/echo", headers=mine_h)
    task = (await resp.json())["id"]
    assert resp.status == 202
    assert (await client.get(f"/tasks/{task}")).status == 401
    assert (await client.get(f"/tasks/{task}", headers=theirs_h)).status == 403
    assert (await client.get(f"/tasks/{task}", headers=mine_h)).status == 200
    assert (await client.get(f"/tasks/{task}", headers=ADMIN)).status == 200
    assert (await client.delete(f"/tasks/{task}", headers=theirs_h)).status == 403
    listed = await (await client.get("/v1/endpoints/priv/tokens", headers=ADMIN)).json()
    assert listed["tokens"] == [{"id": mine["id"], "endpoint": "priv",
                                 "created_at": mine["created_at"],
                                 "requests_per_minute": None, "tokens_per_day": None}]
    resp = await client.delete(f"/v1/endpoints/priv/tokens/{mine['id']}", headers=ADMIN)
    assert resp.status == 200
    assert await call({"Authorization": f"Bearer {mine['token']}"}) == 401  # revoked at once
    assert (await client.get("/v1/endpoints")).status == 401
    resp = await client.get("/v1/endpoints", headers={"Authorization": f"Bearer {theirs['token']}"})
    assert resp.status == 403
    stored = await h.store.tokens()
    assert all(theirs["token"] not in str(t) for t in stored)  # only hashes are kept


async def test_secrets_are_injected_and_never_shown(api):
    h, client = await api()
    resp = await client.post("/v1/endpoints", headers=ADMIN,
                             json=body("s", min_replicas=1, secrets=["HF_TOKEN"]))
    assert resp.status == 201
    pool = h.reconciler.pool("s")
    await wait_for(pool, lambda: pool.error is not None, what="missing secret")
    shown = await (await client.get("/v1/endpoints/s", headers=ADMIN)).json()
    assert shown["status"] == "error" and "secret HF_TOKEN is not stored" in shown["error"]
    resp = await client.put("/v1/secrets/HF_TOKEN", headers=ADMIN, json={"value": "hf_s3cr3t"})
    assert resp.status == 200
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready once the secret exists")
    env = await (await client.get("/invoke/s/env", headers=ADMIN)).json()
    assert env["HF_TOKEN"] == "hf_s3cr3t"
    for path in ("/v1/endpoints/s", "/v1/endpoints", "/v1/secrets", "/v1/events"):
        text = await (await client.get(path, headers=ADMIN)).text()
        assert "hf_s3cr3t" not in text
    secrets = (await (await client.get("/v1/secrets", headers=ADMIN)).json())["secrets"]
    assert [s["name"] for s in secrets] == ["HF_TOKEN"] and "value" not in secrets[0]
    bad = await client.put("/v1/secrets/9bad", headers=ADMIN, json={"value": "x"})
    assert bad.status == 422
    bad = await client.put("/v1/secrets/OK", headers=ADMIN, json={"value": 3})
    assert bad.status == 422
    assert (await client.delete("/v1/secrets/HF_TOKEN", headers=ADMIN)).status == 200
    assert (await client.delete("/v1/secrets/HF_TOKEN", headers=ADMIN)).status == 404


async def test_logs_follow_and_events(api):
    h, client = await api()
    await client.post("/v1/endpoints", headers=ADMIN, json=body("l", min_replicas=1))
    pool = h.reconciler.pool("l")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [replica] = pool.replicas.values()
    resp = await client.get("/v1/endpoints/l/logs?follow=true&tail=all", headers=ADMIN)
    assert resp.status == 200
    first = await asyncio.wait_for(resp.content.readline(), 5)
    assert first.decode().startswith(f"[{replica.id}] model server listening")
    await client.get("/invoke/l/echo?marker=abc123", headers=ADMIN)
    for _ in range(50):
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode()
        if "marker=abc123" in line:
            break
    assert line.startswith(f"[{replica.id}] ") and "GET /echo?marker=abc123" in line
    resp.close()
    resp = await client.get("/v1/endpoints/l/logs?tail=1&replica=nope", headers=ADMIN)
    assert resp.status == 404
    events = (await (await client.get("/v1/events?endpoint=l", headers=ADMIN)).json())["events"]
    kinds = [e["kind"] for e in events]
    assert kinds[:4] == ["endpoint_created", "scale_up", "start", "ready"]
    assert all(e["endpoint"] == "l" and e["ts"] > 0 and e["message"] for e in events)
    later = await client.get(f"/v1/events?since={events[-1]['ts'] + 1}", headers=ADMIN)
    assert (await later.json())["events"] == []


async def test_rolling_change_without_a_failed_call(api):
    h, client = await api()
    await client.post("/v1/endpoints", headers=ADMIN, json=body("roll", min_replicas=1))
    pool = h.reconciler.pool("roll")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [old] = pool.replicas.values()
    async with CallsInFlight(client, "/invoke/roll/sleep?s=0.05", 3, ADMIN) as calls:
        await asyncio.sleep(0.3)
        resp = await client.patch("/v1/endpoints/roll", headers=ADMIN,
                                  json={"image": body("x")["image"], "env": {"V": "2"}})
        assert resp.status == 200 and (await resp.json())["generation"] == 2
        await wait_for(pool, lambda: old.state is S.STOPPED, what="old replica gone")
        await asyncio.sleep(0.3)
    assert len(calls.statuses) > 20 and set(calls.statuses) == {200}
    env = await (await client.get("/invoke/roll/env", headers=ADMIN)).json()
    assert env["V"] == "2"


async def test_followed_logs_take_in_replicas_started_later(api):
    h, client = await api()
    await client.post("/v1/endpoints", headers=ADMIN,
                      json=body("grow", min_replicas=1, max_replicas=2))
    pool = h.reconciler.pool("grow")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [first] = pool.replicas.values()
    resp = await client.get("/v1/endpoints/grow/logs?follow=true&tail=0", headers=ADMIN)
    await client.patch("/v1/endpoints/grow", headers=ADMIN, json={"min_replicas": 2})
    await wait_for(pool, lambda: ready_count(pool) == 2, what="second replica")
    [second] = [r for r in pool.replicas.values() if r.id != first.id]
    for _ in range(100):
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode()
        if line.startswith(f"[{second.id}] "):
            break
    assert line == f"[{second.id}] model server listening on 8080 as {second.id}\n"
    resp.close()


async def test_restart_replaces_every_replica_new_first_without_a_failed_call(api):
    # Config-owned: a restart changes nothing in the file, so the file's owner may ask it too.
    h, client = await api({"rs": endpoint("rs", min_replicas=1)})
    pool = h.reconciler.pool("rs")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [old] = pool.replicas.values()
    async with CallsInFlight(client, "/invoke/rs/sleep?s=0.05", 2, ADMIN) as calls:
        resp = await client.post("/v1/endpoints/rs/restart", headers=ADMIN)
        assert resp.status == 200 and (await resp.json())["generation"] == 2
        await wait_for(pool, lambda: old.state is S.STOPPED, what="old replica gone")
        [new] = [r for r in pool.replicas.values() if r.state is S.READY]
    assert new.container_id != old.container_id and new.generation == 2
    assert len(calls.statuses) > 5 and set(calls.statuses) == {200}
    [record] = [e for e in await h.store.endpoints() if e.name == "rs"]
    assert record.generation == 2  # stored: a restart of berthd does not roll back
    kinds = [e.kind for e in await h.store.events("rs")]
    assert "endpoint_restarted" in kinds
    assert (await client.post("/v1/endpoints/nope/restart", headers=ADMIN)).status == 404
    assert (await client.post("/v1/endpoints/rs/restart")).status == 401


async def test_racing_endpoint_writes_never_undo_each_other(api):
    h, client = await api()
    for i in range(5):  # a restart racing a delete: the endpoint stays deleted
        name = f"race{i}"
        await client.post("/v1/endpoints", headers=ADMIN, json=body(name))
        deleted, restarted = await asyncio.gather(
            client.delete(f"/v1/endpoints/{name}", headers=ADMIN),
            client.post(f"/v1/endpoints/{name}/restart", headers=ADMIN))
        assert deleted.status == 200 and restarted.status in (200, 404)
        assert name not in [e.name for e in await h.store.endpoints()]
    # Two PATCHes of different fields at once: both land.
    await client.post("/v1/endpoints", headers=ADMIN, json=body("p", max_replicas=2))
    answers = await asyncio.gather(
        client.patch("/v1/endpoints/p", headers=ADMIN, json={"max_replicas": 5}),
        client.patch("/v1/endpoints/p", headers=ADMIN, json={"queue_limit": 7}))
    assert [a.status for a in answers] == [200, 200]
    spec = (await (await client.get("/v1/endpoints/p", headers=ADMIN)).json())["spec"]
    assert (spec["max_replicas"], spec["queue_limit"]) == (5, 7)
