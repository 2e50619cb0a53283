"""The data plane against real replicas: routing, queueing, scaling, timeouts, eviction."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from berth.daemon.app import build_app
from berth.scheduler.replica import ReplicaState
from helpers import GuardedTestServer, endpoint, ready_count, wait_for

S = ReplicaState


@pytest.fixture
async def plane(harness, aiohttp_client):
    """A harness (reconciler on a real engine) plus the app on a real loopback port."""
    async def make(specs: dict, gpus: int = 0, max_body: int = 10 * 1024 ** 2):
        h = await harness(gpus=gpus)
        await h.reconciler.apply_specs(specs, "config")
        app = build_app(h.reconciler, h.reconciler.allocator, max_body_bytes=max_body)
        client = await aiohttp_client(GuardedTestServer(app))  # as berthd listens
        return h, client
    return make


async def ready(h, name: str, count: int) -> list:
    pool = h.reconciler.pool(name)
    await wait_for(pool, lambda: ready_count(pool) == count, what=f"{count} ready")
    return [r for r in pool.replicas.values() if r.state is S.READY]


async def stats(address: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"http://{address}/stats") as r:
        return await r.json()


async def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics as {(sample name, sorted labels): value}."""
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(await resp.text())
            for s in family.samples}


async def test_round_robin_over_three_replicas(plane):
    h, client = await plane({"rr": endpoint("rr", min_replicas=3, max_replicas=3)})
    await ready(h, "rr", 3)
    seen = []
    for _ in range(9):
        resp = await client.get("/invoke/rr/echo?x=1", headers={"X-Request-Id": "abc"})
        body = await resp.json()
        assert resp.status == 200 and body["query"] == {"x": "1"}
        assert body["headers"]["X-Request-Id"] == "abc"
        assert resp.headers["X-Berth-Replica"] == body["replica"]
        seen.append(resp.headers["X-Berth-Replica"])
    assert len(set(seen[:3])) == 3 and seen[3:6] == seen[:3] and seen[6:] == seen[:3]


async def test_pinned_replica_and_unknown_one(plane):
    h, client = await plane({"pin": endpoint("pin", min_replicas=2, max_replicas=2)})
    replicas = await ready(h, "pin", 2)
    target = replicas[1].id
    for _ in range(3):
        resp = await client.get("/invoke/pin/echo", headers={"X-Berth-Replica": target})
        assert resp.headers["X-Berth-Replica"] == target
        assert "X-Berth-Replica" not in (await resp.json())["headers"]
    resp = await client.get("/invoke/pin/echo", headers={"X-Berth-Replica": "pin-nope"})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "replica_not_found"


async def test_concurrency_per_replica_is_respected_under_20_parallel_calls(plane):
    h, client = await plane({"cc": endpoint("cc", min_replicas=2, max_replicas=2,
                                            concurrency=2)})
    replicas = await ready(h, "cc", 2)
    pool = h.reconciler.pool("cc")
    peak = 0

    async def watch():
        nonlocal peak
        while True:
            peak = max(peak, *(r.in_flight for r in pool.replicas.values()))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    responses = await asyncio.gather(*(client.get("/invoke/cc/sleep?s=0.1") for _ in range(20)))
    watcher.cancel()
    assert [r.status for r in responses] == [200] * 20
    assert peak == 2
    for replica in replicas:
        s = await stats(replica.address)
        assert s["max_active"] <= 2 and s["calls"] == 10


async def test_full_queue_answers_429_with_retry_after(plane):
    h, client = await plane({"q": endpoint("q", min_replicas=1, queue_limit=1)})
    await ready(h, "q", 1)
    first = asyncio.create_task(client.get("/invoke/q/sleep?s=0.5"))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(client.get("/invoke/q/sleep?s=0.01"))
    await asyncio.sleep(0.1)
    third = await client.get("/invoke/q/echo")
    assert third.status == 429 and third.headers["Retry-After"] == "1"
    assert (await third.json())["error"]["code"] == "queue_full"
    assert (await first).status == 200 and (await second).status == 200


async def test_scale_from_zero_on_first_call_and_back_to_zero_when_idle(plane):
    h, client = await plane({"zero": endpoint("zero", min_replicas=0, idle_timeout_s=0.5)})
    pool = h.reconciler.pool("zero")
    await asyncio.sleep(0.3)
    assert not pool.replicas  # scaled to zero: nothing runs
    resp = await client.get("/invoke/zero/echo")
    assert resp.status == 200
    replica_id = resp.headers["X-Berth-Replica"]
    await wait_for(pool, lambda: not pool.replicas, timeout=10, what="scale to zero")
    kinds = [(e.kind, e.replica) for e in await h.store.events("zero")]
    assert ("scale_up", replica_id) in kinds and ("scale_down", replica_id) in kinds
    assert h.reconciler.allocator.owners() == {}


async def test_slow_call_gets_504_and_the_replica_stops_working_on_it(plane):
    h, client = await plane({"slow": endpoint("slow", min_replicas=1, request_timeout_s=0.3)})
    [replica] = await ready(h, "slow", 1)
    started = time.monotonic()
    resp = await client.get("/invoke/slow/sleep?s=5")
    assert resp.status == 504 and time.monotonic() - started < 1.5
    assert (await resp.json())["error"] == {
        "code": "timeout", "message": "call exceeded request_timeout_s=0.3"}
    for _ in range(50):  # the model saw its caller hang up
        if (await stats(replica.address))["abandoned"] == 1:
            break
        await asyncio.sleep(0.02)
    assert (await stats(replica.address))["abandoned"] == 1
    assert replica.in_flight == 0


async def test_sse_events_arrive_as_the_replica_sends_them(plane):
    h, client = await plane({"sse": endpoint("sse", min_replicas=1)})
    await ready(h, "sse", 1)
    resp = await client.get("/invoke/sse/stream?n=4&interval=0.25")
    assert resp.headers["Content-Type"] == "text/event-stream"
    arrivals, buffer = [], b""
    async for chunk in resp.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            _, buffer = buffer.split(b"\n\n", 1)
            arrivals.append(time.monotonic())
    assert len(arrivals) == 4
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(0.15 < g < 0.5 for g in gaps), gaps  # spaced, not all at the end


async def test_sse_stream_cut_by_timeout_ends_with_an_error_event(plane):
    h, client = await plane({"cut": endpoint("cut", min_replicas=1, request_timeout_s=0.5)})
    await ready(h, "cut", 1)
    resp = await client.get("/invoke/cut/stream?n=10&interval=0.2")
    assert resp.status == 200
    text = (await resp.content.read()).decode()
    assert text.count("data: {\"i\"") in (2, 3)
    assert text.rstrip().endswith(
        'event: error\ndata: {"error": {"code": "timeout", "message": '
        '"call exceeded request_timeout_s=0.5"}}')


async def test_client_disconnect_frees_the_slot_at_once(plane):
    h, client = await plane({"dc": endpoint("dc", min_replicas=1)})
    [replica] = await ready(h, "dc", 1)
    call = asyncio.create_task(client.get("/invoke/dc/sleep?s=10"))
    await asyncio.sleep(0.2)
    assert replica.in_flight == 1
    call.cancel()  # the client goes away
    started = time.monotonic()
    resp = await client.get("/invoke/dc/echo")
    assert resp.status == 200 and time.monotonic() - started < 1.0
    for _ in range(50):
        if (await stats(replica.address))["abandoned"] == 1:
            break
        await asyncio.sleep(0.02)
    assert (await stats(replica.address))["abandoned"] == 1


async def test_eviction_shares_one_gpu_between_two_endpoints(plane):
    specs = {"first": endpoint("first", gpus=1, min_replicas=0, idle_timeout_s=60),
             "second": endpoint("second", gpus=1, min_replicas=0, idle_timeout_s=60)}
    h, client = await plane(specs, gpus=1)
    resp = await client.get("/invoke/first/echo")
    assert resp.status == 200
    first_replica = resp.headers["X-Berth-Replica"]
    resp = await client.get("/invoke/second/echo")  # no free GPU: first's idle replica goes
    assert resp.status == 200
    events = await h.store.events("first")
    assert any(e.kind == "eviction" and e.replica == first_replica
               and "GPUs needed by second" in e.message for e in events)
    resp = await client.get("/invoke/first/echo")  # and back again
    assert resp.status == 200 and resp.headers["X-Berth-Replica"] != first_replica
    assert any(e.kind == "eviction" for e in await h.store.events("second"))
    assert len(h.reconciler.allocator.owners()) == 1


async def test_errors_are_specific(plane):
    specs = {"ok": endpoint("ok", min_replicas=1),
             "broken": endpoint("broken", min_replicas=1, image="berth-test/missing:never")}
    h, client = await plane(specs, max_body=1000)
    await ready(h, "ok", 1)
    resp = await client.get("/invoke/nope/x")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "endpoint_not_found"
    pool = h.reconciler.pool("broken")
    await wait_for(pool, lambda: pool.error is not None, what="image error")
    resp = await client.get("/invoke/broken/x")
    body = await resp.json()
    assert resp.status == 503 and "berth-test/missing:never" in body["error"]["message"]
    assert resp.headers["Retry-After"]
    resp = await client.post("/invoke/ok/echo", data=b"x" * 2000)
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "payload_too_large"

    async def chunked():
        for _ in range(3):
            yield b"y" * 600
    resp = await client.post("/invoke/ok/upload", data=chunked())
    assert resp.status == 413


async def test_replica_failing_mid_call_gives_502(plane):
    h, client = await plane({"mid": endpoint("mid", min_replicas=1)})
    await ready(h, "mid", 1)
    resp = await client.post("/invoke/mid/crash")
    assert resp.status == 502 and (await resp.json())["error"]["code"] == "replica_failed"


async def test_refused_connection_is_retried_on_another_replica(plane):
    h, client = await plane({"re": endpoint("re", min_replicas=2, max_replicas=2,
                                            liveness={"period_s": 30})})
    replicas = await ready(h, "re", 2)
    async with aiohttp.ClientSession() as s:
        await s.post(f"http://{replicas[0].address}/close-listener")
    await asyncio.sleep(0.1)
    for _ in range(4):
        resp = await client.get("/invoke/re/echo")
        assert resp.status == 200 and resp.headers["X-Berth-Replica"] == replicas[1].id


async def test_large_bodies_stream_both_ways(plane):
    h, client = await plane({"big": endpoint("big", min_replicas=1)}, max_body=64 * 1024 ** 2)
    await ready(h, "big", 1)
    block = bytes(range(256)) * 4096  # 1 MiB

    async def upload():
        for _ in range(32):
            yield block
    resp = await client.post("/invoke/big/upload", data=upload())
    body = await resp.json()
    assert body == {"size": 32 * len(block),
                    "sha256": hashlib.sha256(block * 32).hexdigest()}
    resp = await client.get(f"/invoke/big/bytes?n={48 * 1024 ** 2}")
    assert resp.headers["Content-Length"] == str(48 * 1024 ** 2)
    total = 0
    async for chunk in resp.content.iter_chunked(1024 ** 2):
        total += len(chunk)
    assert total == 48 * 1024 ** 2


async def test_no_replica_ready_in_time_gives_503(plane):
    _, client = await plane({"never": endpoint("never", startup_timeout_s=0.5,
                                               env={"MODEL_FAIL_HEALTH": "1"})})
    started = time.monotonic()
    resp = await client.get("/invoke/never/echo")
    body = await resp.json()
    assert resp.status == 503 and body["error"]["code"] == "no_capacity"
    assert "within startup_timeout_s=0.5" in body["error"]["message"]
    assert resp.headers["Retry-After"] and time.monotonic() - started < 2


async def test_burst_from_zero_starts_the_replicas_needed_in_parallel(plane):
    h, client = await plane({"burst": endpoint("burst", max_replicas=3)})
    # Each call outlasts the spread of the three starts, so no replica serves two of them.
    responses = await asyncio.gather(*(client.get("/invoke/burst/sleep?s=1.5")
                                       for _ in range(3)))
    assert [r.status for r in responses] == [200] * 3
    assert len({r.headers["X-Berth-Replica"] for r in responses}) == 3
    events = await h.store.events("burst")
    launched = [e.ts for e in events if e.kind == "scale_up"]
    readied = [e.ts for e in events if e.kind == "ready"]
    # Together, not one by one: all three were launched before the first one was ready (a
    # machine-speed-free test of overlap; one by one would put a ready between launches).
    assert len(launched) == 3 and len(readied) == 3 and max(launched) < min(readied)


async def test_a_replica_is_never_stopped_with_a_call_in_flight(plane):
    h, client = await plane({"busy": endpoint("busy", idle_timeout_s=0.2)})
    resp = await client.get("/invoke/busy/echo")
    first = resp.headers["X-Berth-Replica"]
    await asyncio.sleep(0.1)
    resp = await client.get("/invoke/busy/sleep?s=1.0")  # longer than idle_timeout_s
    ended = time.time()
    assert resp.status == 200 and resp.headers["X-Berth-Replica"] == first
    pool = h.reconciler.pool("busy")
    await wait_for(pool, lambda: not pool.replicas, what="idle stop after the call")
    [drain] = [e for e in await h.store.events("busy") if e.kind == "drain"]
    assert drain.ts >= ended + 0.15  # idle counted from the end of the call, not its start


async def test_call_waits_for_a_busy_gpu_and_gets_it_when_freed(plane):
    specs = {"holder": endpoint("holder", gpus=1, idle_timeout_s=60),
             "waiter": endpoint("waiter", gpus=1, idle_timeout_s=60)}
    h, client = await plane(specs, gpus=1)
    busy = asyncio.create_task(client.get("/invoke/holder/sleep?s=0.8"))
    await asyncio.sleep(0.5)  # holder's replica is up and busy: nothing can be evicted
    started = time.monotonic()
    resp = await client.get("/invoke/waiter/echo")
    assert resp.status == 200 and time.monotonic() - started >= 0.2
    assert (await busy).status == 200
    assert any(e.kind == "eviction" for e in await h.store.events("holder"))


async def test_connections_to_replicas_are_kept_alive(plane):
    h, client = await plane({"ka": endpoint("ka", min_replicas=1)})
    await ready(h, "ka", 1)
    ports = set()
    for _ in range(5):
        resp = await client.get("/invoke/ka/echo")
        ports.add((await resp.json())["client_port"])
    assert len(ports) == 1  # five calls, one pooled connection from berth to the replica


async def test_metrics_count_calls_by_answer_and_show_live_replicas_and_gpus(plane,
                                                                             docker_client):
    h, client = await plane({"m": endpoint("m", min_replicas=1, gpus=1)}, gpus=2)
    [replica] = await ready(h, "m", 1)
    for _ in range(2):
        assert (await client.get("/invoke/m/echo")).status == 200
    assert (await client.get("/invoke/m/status/418")).status == 418  # the model's answer
    pinned = await client.get("/invoke/m/echo", headers={"X-Berth-Replica": "m-nope"})
    assert pinned.status == 404
    assert (await client.get("/invoke/nope/echo")).status == 404  # no series for unknown names
    call = asyncio.create_task(client.get("/invoke/m/sleep?s=10"))
    await wait_for(h.reconciler.pool("m"), lambda: replica.in_flight == 1, what="in flight")
    during = await scrape(client)
    call.cancel()  # the client leaves: counted as 499
    await wait_for(h.reconciler.pool("m"), lambda: replica.in_flight == 0, what="slot freed")
    after = await scrape(client)

    def calls(code: str) -> float:
        return after.get(("berth_calls_total", (("code", code), ("endpoint", "m"))), 0)

    assert (calls("200"), calls("418"), calls("404"), calls("499")) == (2, 1, 1, 1)
    assert after[("berth_call_duration_seconds_count", (("endpoint", "m"),))] == 5
    assert not any(dict(labels).get("endpoint") == "nope" for _, labels in after)
    assert during[("berth_calls_in_flight", (("endpoint", "m"),))] == 1
    assert after[("berth_calls_in_flight", (("endpoint", "m"),))] == 0
    assert after[("berth_replicas", (("endpoint", "m"), ("state", "ready")))] == 1
    held = {dict(labels)["gpu"]: value for (name, labels), value in after.items()
            if name == "berth_gpu_allocated"}
    assert sorted(held.values()) == [0, 1] and len(held) == 2
    assert after[("berth_state_disk_min_free_bytes", ())] == 0
    # A crash is counted once, by endpoint and kind (the crash-loop alert's metric).
    docker_client.containers.get(replica.container_id).kill()
    await wait_for(h.reconciler.pool("m"), lambda: replica.state is ReplicaState.FAILED,
                   what="crash seen")
    crashed = await scrape(client)
    assert crashed[("berth_replica_failures_total", (("endpoint", "m"), ("kind", "crash")))] == 1
