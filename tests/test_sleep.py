"""The sleep tier: idle replicas are put to sleep (the model's sleep call; the container and
its GPUs stay), a call wakes one (the wake call, then readiness) and is served by it; a wake
that fails fails the replica and the call is served by the replacement; idle_timeout_s still
stops a sleeper. Against the demo model, which sleeps and wakes as vLLM does."""

from __future__ import annotations

import asyncio
import time

import pytest

from berth.daemon.config import ConfigError, parse_config
from berth.scheduler.policy import plan_sleeps, plan_wakes
from berth.scheduler.replica import Replica, ReplicaState
from helpers import endpoint, ready_count, wait_for

S = ReplicaState
ADMIN = {"Authorization": "Bearer admin-secret"}


def replica(rid: str, state: ReplicaState, idle_since: float = 0.0, in_flight: int = 0,
            generation: int = 1) -> Replica:
    return Replica(id=rid, endpoint="e", generation=generation, state=state,
                   created_at=idle_since, ready_at=idle_since, in_flight=in_flight)


@pytest.mark.parametrize(("replicas", "sleeps"), [
    ([replica("a", S.READY, idle_since=0)], ["a"]),
    ([replica("a", S.READY, idle_since=95)], []),                 # idle for 5 s only
    ([replica("a", S.READY, idle_since=0, in_flight=1)], []),     # a call in flight
    ([replica("a", S.READY, idle_since=0, generation=0)], []),    # an old one rolls away
    ([replica("a", S.STARTING), replica("b", S.SLEEPING)], []),
])
def test_plan_sleeps(replicas, sleeps):
    assert plan_sleeps(replicas, 1, after_s=10, now=100) == sleeps


@pytest.mark.parametrize(("replicas", "waking", "waiting", "wakes"), [
    ([replica("a", S.SLEEPING)], frozenset(), 0, []),
    ([replica("a", S.SLEEPING)], frozenset(), 1, ["a"]),
    ([replica("a", S.SLEEPING)], frozenset({"a"}), 1, []),       # already waking
    ([replica("a", S.SLEEPING, 1), replica("b", S.SLEEPING, 5)], frozenset(), 1, ["b"]),
    ([replica("a", S.SLEEPING, 1), replica("b", S.SLEEPING, 5)], frozenset(), 2, ["b", "a"]),
    ([replica("a", S.SLEEPING), replica("s", S.STARTING)], frozenset(), 1, []),  # one coming
])
def test_plan_wakes(replicas, waking, waiting, wakes):
    assert plan_wakes(replicas, waking, waiting, concurrency=1) == wakes


def test_sleep_must_come_before_the_idle_stop():
    with pytest.raises(ConfigError) as caught:
        parse_config({"endpoints": {"x": {"image": "i", "idle_timeout_s": 60,
                                          "sleep": {"after_s": 60}}}})
    assert [i.path for i in caught.value.issues] == ["endpoints.x.sleep.after_s"]
    with pytest.raises(ConfigError):
        parse_config({"endpoints": {"x": {"image": "i", "sleep": {"after_s": 1,
                                                                   "wake": "WAKE /up"}}}})


async def test_a_call_wakes_a_sleeping_replica_faster_than_a_load(api, docker_client):
    h, client = await api({"llm": endpoint(
        "llm", min_replicas=1, idle_timeout_s=60, sleep={"after_s": 0.3, "wake_timeout_s": 5},
        env={"LOAD_S": "1.5", "WAKE_S": "0.3"})})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="loaded")
    [sleeper] = pool.replicas.values()
    await wait_for(pool, lambda: sleeper.state is S.SLEEPING, what="asleep")
    await asyncio.sleep(0.2)  # the sleep call went out
    assert docker_client.containers.get(sleeper.container_id).status == "running"
    assert (await (await client.get("/v1/endpoints/llm", headers=ADMIN)).json())["status"] \
        == "sleeping"
    started = time.monotonic()
    resp = await client.get("/invoke/llm/echo", headers=ADMIN)
    took = time.monotonic() - started
    assert resp.status == 200 and resp.headers["X-Berth-Replica"] == sleeper.id
    assert 0.3 <= took < 1.5  # the wake time, not a load
    kinds = [e.kind for e in await h.store.events("llm")]
    assert kinds.count("sleep") >= 1 and kinds.count("wake") == 1
    assert kinds.count("start") == 1  # the same container all along
    metrics = (await (await client.get("/metrics", headers=ADMIN)).text()).splitlines()
    assert 'berth_replica_start_seconds_count{endpoint="llm",phase="wake"} 1.0' in metrics
    # Asleep again, an async task wakes it too.
    await wait_for(pool, lambda: sleeper.state is S.SLEEPING, what="asleep again")
    task = await (await client.post("/async/llm/echo", headers=ADMIN)).json()
    for _ in range(100):
        done = await (await client.get(f"/tasks/{task['id']}", headers=ADMIN)).json()
        if done["status"] == "succeeded":
            break
        await asyncio.sleep(0.05)
    assert done["status"] == "succeeded" and done["replica"] == sleeper.id


async def test_a_failed_wake_replaces_the_replica_and_keeps_the_call(api):
    h, client = await api({"llm": endpoint(
        "llm", min_replicas=1, idle_timeout_s=60,
        sleep={"after_s": 0.2, "wake": "POST /status/500", "wake_timeout_s": 2})})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [sleeper] = pool.replicas.values()
    await wait_for(pool, lambda: sleeper.state is S.SLEEPING, what="asleep")
    resp = await client.get("/invoke/llm/echo", headers=ADMIN)
    assert resp.status == 200 and resp.headers["X-Berth-Replica"] != sleeper.id
    assert sleeper.state is S.FAILED and "wake call POST /status/500 failed: answered 500" \
        in sleeper.reason


async def test_idle_timeout_still_stops_a_sleeper(api):
    h, client = await api({"llm": endpoint("llm", min_replicas=0, idle_timeout_s=0.8,
                                           sleep={"after_s": 0.2})})
    assert (await client.get("/invoke/llm/echo", headers=ADMIN)).status == 200
    pool = h.reconciler.pool("llm")
    [replica] = pool.replicas.values()
    await wait_for(pool, lambda: replica.state is S.SLEEPING, what="asleep")
    await wait_for(pool, lambda: replica.state is S.STOPPED, what="stopped", timeout=10)
    assert h.reconciler.allocator.owners() == {}


async def test_a_sleeper_is_stopped_when_its_sleep_tier_is_removed(api):
    # The change applies in place (no roll): nothing would ever wake it, and, counted as
    # capacity, it kept a replacement from starting.
    h, _client = await api({"llm": endpoint("llm", min_replicas=1, sleep={"after_s": 0.2})})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [replica] = pool.replicas.values()
    await wait_for(pool, lambda: replica.state is S.SLEEPING, what="asleep")
    await h.reconciler.apply_specs({"llm": endpoint("llm", min_replicas=1)}, "config")
    await wait_for(pool, lambda: replica.state is S.STOPPED, what="the sleeper stopped")
    assert "sleep tier removed" in (replica.reason or "")
    await wait_for(pool, lambda: ready_count(pool) == 1, timeout=20, what="a replacement")


async def test_a_wake_that_hangs_is_cut_at_wake_timeout_and_the_call_still_served(api):
    h, client = await api({"llm": endpoint(
        "llm", min_replicas=1, idle_timeout_s=60,
        sleep={"after_s": 0.2, "wake": "POST /sleep?s=30", "wake_timeout_s": 0.5})})
    pool = h.reconciler.pool("llm")
    await wait_for(pool, lambda: ready_count(pool) == 1, what="ready")
    [sleeper] = pool.replicas.values()
    await wait_for(pool, lambda: sleeper.state is S.SLEEPING, what="asleep")
    started = time.monotonic()
    resp = await client.get("/invoke/llm/echo", headers=ADMIN)
    assert resp.status == 200 and resp.headers["X-Berth-Replica"] != sleeper.id
    assert time.monotonic() - started < 10  # cut at 0.5 s, then a fresh replica: no hang
    assert sleeper.state is S.FAILED and "wake call POST /sleep?s=30 failed" in sleeper.reason
