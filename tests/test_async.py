"""Async calls against real replicas: submit, dispatch, results, cancel, callbacks, purge."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import aiohttp
import pytest
from aiohttp import web

from berth.daemon.app import build_app
from berth.scheduler.callbacks import CallbackSender
from berth.scheduler.dispatch import Dispatcher, DispatchSettings
from berth.scheduler.egress import CallbackPolicy
from berth.scheduler.router import Router
from helpers import GuardedTestServer, endpoint, ready_count, wait_for

SECRET = b"test-callback-key"


@pytest.fixture
async def aplane(harness, aiohttp_client, tmp_path):
    made = []

    async def make(specs: dict, max_body: int = 10 * 1024 ** 2, gpus: int = 0):
        h = await harness(gpus=gpus)
        await h.reconciler.apply_specs(specs, "config")
        callbacks = CallbackSender(h.store, SECRET, retry_for_s=5, backoff_s=0.1,
                                   policy=CallbackPolicy(["127.0.0.0/8"]))
        dispatcher = Dispatcher(h.store, Router(h.reconciler), tmp_path / "tasks", callbacks,
                                DispatchSettings(max_attempts=3, retry_backoff_s=0.1))
        await dispatcher.start()
        made.append((dispatcher, callbacks))
        app = build_app(h.reconciler, h.reconciler.allocator, dispatcher=dispatcher,
                        max_async_body_bytes=max_body)
        client = await aiohttp_client(GuardedTestServer(app))  # as berthd listens
        return h, client, dispatcher
    yield make
    for dispatcher, callbacks in made:
        await dispatcher.stop()
        await callbacks.close()


async def finished(client, task_id: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = await (await client.get(f"/tasks/{task_id}")).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"task {task_id} did not finish: {body}")


async def stats(address: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"http://{address}/stats") as r:
        return await r.json()


async def test_submit_poll_result_round_trip(aplane):
    _, client, _ = await aplane({"echo": endpoint("echo", min_replicas=1)})
    resp = await client.post("/async/echo/echo?x=1", data=b"hello",
                             headers={"X-Custom": "kept", "Content-Type": "text/plain"})
    assert resp.status == 202
    task = await resp.json()
    assert resp.headers["Location"] == f"/tasks/{task['id']}"
    assert (task["endpoint"], task["status"], task["attempts"]) == ("echo", "queued", 0)
    assert len(task["id"]) >= 22 and task["created_at"] > 0
    done = await finished(client, task["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert done["result"] == {"status": 200, "content_type": "application/json"}
    assert done["started_at"] <= done["finished_at"]
    resp = await client.get(f"/tasks/{task['id']}/result")
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
    echoed = await resp.json()
    assert (echoed["method"], echoed["path"], echoed["query"], echoed["body"]) == \
        ("POST", "/echo", {"x": "1"}, "hello")
    assert echoed["headers"]["X-Custom"] == "kept"
    assert echoed["headers"]["X-Request-Id"] == task["id"]
    listed = await (await client.get("/v1/tasks?endpoint=echo&status=succeeded")).json()
    assert [t["id"] for t in listed["tasks"]] == [task["id"]]
    assert (await client.get("/v1/tasks?status=weird")).status == 400
    assert (await client.get("/tasks/nope")).status == 404


async def test_model_errors_are_results_not_retries(aplane):
    _, client, _ = await aplane({"e": endpoint("e", min_replicas=1)})
    task = await (await client.post("/async/e/status/503")).json()
    done = await finished(client, task["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert (await client.get(f"/tasks/{task['id']}/result")).status == 503


async def test_backlog_of_50_scales_up_from_zero_and_all_finish(aplane):
    h, client, _ = await aplane({"work": endpoint("work", max_replicas=3, concurrency=2)})
    pool = h.reconciler.pool("work")
    assert not pool.replicas
    ids = [(await (await client.post("/async/work/sleep?s=0.1")).json())["id"]
           for _ in range(50)]
    peak = 0
    while True:
        peak = max(peak, ready_count(pool))
        states = [(await (await client.get(f"/tasks/{i}")).json())["status"] for i in ids]
        if all(s == "succeeded" for s in states):
            break
        assert not any(s in ("failed", "cancelled") for s in states), states
        await asyncio.sleep(0.1)
    assert peak == 3
    assert sum(1 for e in await h.store.events("work") if e.kind == "scale_up") >= 3


async def test_sync_and_async_share_the_replica_slots(aplane):
    h, client, _ = await aplane({"share": endpoint("share", min_replicas=1)})
    pool = h.reconciler.pool("share")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [replica] = pool.replicas.values()
    ids = [(await (await client.post("/async/share/sleep?s=0.15")).json())["id"]
           for _ in range(3)]
    syncs = await asyncio.gather(*(client.get("/invoke/share/sleep?s=0.15") for _ in range(3)))
    assert [r.status for r in syncs] == [200] * 3
    for i in ids:
        assert (await finished(client, i))["status"] == "succeeded"
    s = await stats(replica.address)
    assert s["max_active"] == 1 and s["calls"] == 6


async def test_task_past_async_timeout_fails_and_the_model_stops(aplane):
    h, client, _ = await aplane({"t": endpoint("t", min_replicas=1, async_timeout_s=0.3)})
    task = await (await client.post("/async/t/sleep?s=5")).json()
    done = await finished(client, task["id"])
    assert done["status"] == "failed"
    assert done["error"] == "task exceeded async_timeout_s=0.3"
    [replica] = h.reconciler.pool("t").replicas.values()
    for _ in range(50):
        if (await stats(replica.address))["abandoned"] == 1:
            break
        await asyncio.sleep(0.02)
    assert (await stats(replica.address))["abandoned"] == 1


async def test_task_is_retried_elsewhere_when_its_replica_dies(aplane, docker_client):
    h, client, _ = await aplane({"r": endpoint("r", min_replicas=2, max_replicas=2)})
    pool = h.reconciler.pool("r")
    await wait_for(pool, lambda: ready_count(pool) == 2, what="two ready")
    task = await (await client.post("/async/r/sleep?s=1")).json()
    while (await (await client.get(f"/tasks/{task['id']}")).json())["status"] != "running":
        await asyncio.sleep(0.02)
    first = (await (await client.get(f"/tasks/{task['id']}")).json())["replica"]
    await asyncio.sleep(0.1)
    docker_client.containers.get(pool.replicas[first].container_id).kill()
    done = await finished(client, task["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert done["replica"] != first


async def test_cancel_queued_and_running(aplane):
    h, client, _ = await aplane({"c": endpoint("c", min_replicas=1)})
    pool = h.reconciler.pool("c")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [replica] = pool.replicas.values()
    running = await (await client.post("/async/c/sleep?s=5")).json()
    queued = await (await client.post("/async/c/echo")).json()
    while (await (await client.get(f"/tasks/{running['id']}")).json())["status"] != "running":
        await asyncio.sleep(0.02)
    resp = await client.delete(f"/tasks/{queued['id']}")
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    started = time.monotonic()
    resp = await client.delete(f"/tasks/{running['id']}")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "cancelled"
    assert time.monotonic() - started < 1
    for _ in range(50):
        if (await stats(replica.address))["abandoned"] == 1:
            break
        await asyncio.sleep(0.02)
    assert (await stats(replica.address))["abandoned"] == 1
    assert (await stats(replica.address))["calls"] == 1  # the queued one never ran
    resp = await client.delete(f"/tasks/{running['id']}")
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "task_finished"
    assert (await client.get(f"/tasks/{queued['id']}/result")).status == 404
    assert replica.in_flight == 0


async def test_callback_is_signed_delivered_and_retried(aplane, aiohttp_server):
    received: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers["X-Berth-Signature"]))
        return web.Response(status=500 if len(received) == 1 else 204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    _, client, _ = await aplane({"cb": endpoint("cb", min_replicas=1)})
    resp = await client.post("/async/cb/echo",
                             headers={"X-Callback-Url": f"http://127.0.0.1:{server.port}/hook"})
    task = await resp.json()
    await finished(client, task["id"])
    for _ in range(100):
        state = (await (await client.get(f"/tasks/{task['id']}")).json())["callback"]
        if state["state"] == "delivered":
            break
        await asyncio.sleep(0.05)
    assert state == {"url": f"http://127.0.0.1:{server.port}/hook", "state": "delivered",
                     "attempts": 2, "error": None}
    body, signature = received[-1]
    assert signature == "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    sent = json.loads(body)
    assert (sent["id"], sent["status"]) == (task["id"], "succeeded")
    resp = await client.post("/async/cb/echo", headers={"X-Callback-Url": "ftp://x/y"})
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_callback_url"


async def test_purge_deletes_results_and_files_then_410(aplane, tmp_path):
    _, client, dispatcher = await aplane({"p": endpoint("p", min_replicas=1)})
    big = await (await client.post("/async/p/bytes?n=300000", data=b"z" * 100_000)).json()
    await finished(client, big["id"])
    resp = await client.get(f"/tasks/{big['id']}/result")
    assert resp.status == 200 and len(await resp.read()) == 300_000
    files = sorted(p.name for p in (tmp_path / "tasks").iterdir())
    assert files == [f"{big['id']}.body", f"{big['id']}.result"]
    assert await dispatcher.purge(ttl_s=3600) == 0  # not old enough
    assert await dispatcher.purge(ttl_s=0) == 1
    assert list((tmp_path / "tasks").iterdir()) == []
    resp = await client.get(f"/tasks/{big['id']}/result")
    assert resp.status == 410 and (await resp.json())["error"]["code"] == "result_purged"
    assert (await (await client.get(f"/tasks/{big['id']}")).json())["purged"] is True


async def test_oversized_body_is_refused_and_leaves_nothing(aplane, tmp_path):
    h, client, _ = await aplane({"o": endpoint("o", min_replicas=0)}, max_body=200_000)

    async def chunks():
        for _ in range(5):
            yield b"q" * 65536
    resp = await client.post("/async/o/upload", data=chunks())
    assert resp.status == 413
    resp = await client.post("/async/o/upload", data=b"q" * 300_000)
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "payload_too_large"
    assert list((tmp_path / "tasks").iterdir()) == []
    assert await h.store.tasks.find() == []


def test_a_retry_avoids_the_failed_replica_only_when_another_can_take_it(tmp_path):
    from berth.scheduler.endpoint import Endpoint
    from berth.scheduler.pool import EndpointPool
    from berth.scheduler.replica import Replica, ReplicaState

    pool = EndpointPool(Endpoint(endpoint("x"), "api"))
    for rid in ("a", "b"):
        pool.replicas[rid] = Replica(id=rid, endpoint="x", generation=1,
                                     state=ReplicaState.READY, created_at=0.0)
    dispatcher = Dispatcher(None, None, tmp_path, None, DispatchSettings())  # type: ignore[arg-type]
    dispatcher._excluded["t"] = frozenset({"a"})
    assert dispatcher._avoid(pool, "t") == {"a"}
    pool.replicas["b"].state = ReplicaState.STOPPED
    assert dispatcher._avoid(pool, "t") == frozenset()  # the only one left: try it again
    assert dispatcher._avoid(pool, "other") == frozenset()


async def test_metrics_count_tasks_by_status(aplane):
    _, client, _ = await aplane({"echo": endpoint("echo", min_replicas=1)})
    ids = [(await (await client.post("/async/echo/echo", data=b"x")).json())["id"]
           for _ in range(3)]
    for task_id in ids:
        await finished(client, task_id)
    text = await (await client.get("/metrics")).text()
    assert 'berth_tasks{endpoint="echo",status="succeeded"} 3.0' in text.splitlines()
    counts = (await (await client.get("/v1/tasks/counts")).json())["counts"]
    assert counts == [{"endpoint": "echo", "status": "succeeded", "count": 3}]


class CancelledAtOnce(dict):
    """Dispatcher._running that cancels each job as it is put in: the cancel of a DELETE
    landing in the same pass of the loop as the job's slot, before the job's first step."""

    def __setitem__(self, task_id: str, job: asyncio.Task[None]) -> None:
        job.cancel()
        super().__setitem__(task_id, job)


async def test_a_job_cancelled_before_its_first_step_gives_its_slot_back(aplane):
    h, client, dispatcher = await aplane({"k": endpoint("k", min_replicas=1)})
    pool = h.reconciler.pool("k")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [replica] = pool.replicas.values()
    dispatcher._running = CancelledAtOnce()
    await client.post("/async/k/echo")
    await wait_for(pool, lambda: replica.in_flight == 0 and not dispatcher._running,
                   timeout=5, what="the slot given back")
    assert (await client.get("/invoke/k/echo")).status == 200  # the slot serves calls again


async def test_a_cancel_while_the_end_is_written_waits_for_it_and_says_finished(aplane):
    _h, client, dispatcher = await aplane({"f": endpoint("f", min_replicas=1)})
    writing, go_on = asyncio.Event(), asyncio.Event()
    store = dispatcher._store

    async def slow_end(task, *fields):
        if task.status == "succeeded":
            writing.set()
            await go_on.wait()
        await store(task, *fields)
    dispatcher._store = slow_end
    task = await (await client.post("/async/f/echo")).json()
    await writing.wait()
    cancel = asyncio.ensure_future(client.delete(f"/tasks/{task['id']}"))
    await asyncio.sleep(0.1)  # the DELETE is waiting on the end being written
    go_on.set()
    resp = await cancel
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "task_finished"
    assert (await finished(client, task["id"]))["status"] == "succeeded"


async def test_a_task_whose_body_file_is_gone_fails_instead_of_running_forever(aplane,
                                                                               tmp_path):
    _h, client, _ = await aplane({"g": endpoint("g", min_replicas=0)})
    task = await (await client.post("/async/g/upload", data=b"b" * 100_000)).json()
    for spooled in (tmp_path / "tasks").iterdir():  # (over 64 KiB: kept in a file)
        spooled.unlink()  # as a restore without state_dir/tasks leaves it
    done = await finished(client, task["id"])
    assert done["status"] == "failed" and "berth could not run the task" in done["error"]


async def test_a_task_cut_mid_answer_has_no_result(aplane):
    _h, client, _ = await aplane({"m": endpoint("m", min_replicas=1, async_timeout_s=0.5)})
    task = await (await client.post("/async/m/stream?n=5&interval=1")).json()
    done = await finished(client, task["id"])
    assert done["status"] == "failed" and "async_timeout_s" in done["error"]
    assert done.get("result") in (None, {}), done  # no "status": 200 beside "failed"
    resp = await client.get(f"/tasks/{task['id']}/result")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "no_result"


@pytest.mark.parametrize("url", ["http://[::1", "http://[abc]/", "http://x]y/"])
async def test_a_malformed_callback_url_is_422_not_500(aplane, url):
    _h, client, _ = await aplane({"u": endpoint("u", min_replicas=0)})
    resp = await client.post("/async/u/echo", headers={"X-Callback-Url": url})
    assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_callback_url"


async def test_two_cancels_at_once_end_a_task_once(aplane):
    # Both read it queued; both ended it: counted twice, called back twice.
    _h, client, dispatcher = await aplane({"q": endpoint("q", min_replicas=0,
                                                          env={"MODEL_FAIL_HEALTH": "1"})})
    ended: list[str] = []
    dispatcher.finished_listeners.append(lambda task, meter: ended.append(task.id))
    task = await (await client.post("/async/q/echo")).json()  # queued while its start fails
    answers = await asyncio.gather(*(client.delete(f"/tasks/{task['id']}") for _ in range(2)))
    assert sorted(answer.status for answer in answers) == [200, 409]
    assert ended == [task["id"]]


async def test_a_task_whose_cancel_is_under_way_is_not_started_when_its_slot_comes(aplane):
    # A cancel read the task queued and is ending it when the pump, given a slot meanwhile,
    # reads it too: the pump used to start it, so the task ran and ended twice.
    h, client, dispatcher = await aplane({"q": endpoint("q", min_replicas=1, concurrency=1)})
    pool = h.reconciler.pool("q")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="q ready")
    ended: list[str] = []
    dispatcher.finished_listeners.append(lambda task, meter: ended.append(task.id))
    busy = asyncio.create_task(client.get("/invoke/q/sleep?s=0.8"))  # the one slot, taken
    await wait_for(pool, lambda: any(r.in_flight for r in pool.replicas.values()),
                   what="the slot taken")
    task_id = (await (await client.post("/async/q/echo")).json())["id"]
    get = h.store.tasks.get
    gate, begun = asyncio.Event(), asyncio.Event()
    reads_while_ending = 0

    async def gated_get(tid: str):
        nonlocal reads_while_ending
        if tid == task_id and tid in dispatcher._finishing:
            reads_while_ending += 1
            if reads_while_ending == 1:
                await gate.wait()  # the cancel's read waits...
            else:
                begun.set()  # ... while the pump's job, given the slot, reads the task
        return await get(tid)

    h.store.tasks.get = gated_get
    cancel = asyncio.create_task(client.delete(f"/tasks/{task_id}"))
    await asyncio.wait_for(begun.wait(), 10)
    gate.set()
    assert (await cancel).status == 200
    assert (await busy).status == 200
    for _ in range(100):
        if task_id not in dispatcher._running:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # (a job that ran it would end it now)
    assert ended == [task_id]
    assert (await get(task_id)).status == "cancelled"


async def test_a_task_queued_while_its_removed_endpoints_tasks_are_cancelled_is_cancelled_too(
        aplane):
    # A submit that passed its endpoint check before the endpoint went may queue its task
    # while the store cancels the others: the dispatcher's queue was then cleared whole, and
    # that task stayed queued in SQLite, run by nobody, until berthd restarted.
    from berth.store.records import TaskRecord

    h, client, dispatcher = await aplane({"q": endpoint("q", min_replicas=0,
                                                        env={"MODEL_FAIL_HEALTH": "1"})})
    first = (await (await client.post("/async/q/echo")).json())["id"]  # queued: q never starts
    tasks, cancel_queued = h.store.tasks, h.store.tasks.cancel_queued_of
    late = TaskRecord(id="late-task", endpoint="q", method="GET", path="echo",
                      created_at=time.time())

    async def racing_submit(*args):
        ids = await cancel_queued(*args)
        if not await tasks.get(late.id):  # (once) stored and queued just after the cancel
            assert await tasks.add_within(late, 100, 1 << 30)
            dispatcher.submit(late)
        return ids

    tasks.cancel_queued_of = racing_submit
    await h.reconciler.remove_endpoint("q")
    for _ in range(100):
        ended = [await tasks.get(task_id) for task_id in (first, late.id)]
        if all(t.status == "cancelled" for t in ended):
            break
        await asyncio.sleep(0.05)
    assert [t.status for t in ended] == ["cancelled", "cancelled"]
    assert not dispatcher.queues["q"]
