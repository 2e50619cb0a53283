"""Lending a sleeping replica's GPU: with no GPU free, a replica of another endpoint starts on
the GPU of a sleeper instead of stopping it; to wake, a replica first gets its GPU back (the
other one is put to sleep, or stopped without a sleep tier, or waited for while it has calls).
Pure decisions in tables; a real switch between two endpoints on one GPU, by sleep alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest

from berth.scheduler.policy import (
    CoTenant,
    LendableGpu,
    Reclaim,
    lending_partners,
    pick_loan,
    plan_reclaim,
)
from berth.scheduler.replica import ReplicaState
from helpers import SlowCreates, endpoint, ready_count, wait_for

S = ReplicaState
ADMIN = {"Authorization": "Bearer admin-secret"}


def lendable(uuid: str, priority: int = 0, idle_since: float = 0.0, name: str = "H100",
             index: int = 0) -> LendableGpu:
    return LendableGpu(uuid, index, name, priority, idle_since)


@pytest.mark.parametrize(("gpus", "count", "gpu_type", "priority", "loan"), [
    ([], 1, None, 0, None),                                              # nothing asleep
    ([lendable("a")], 1, None, 0, ["a"]),
    ([lendable("a", priority=5)], 1, None, 0, None),                     # a higher sleeper
    ([lendable("a", 1), lendable("b", 0)], 1, None, 1, ["b"]),           # lowest priority
    ([lendable("a", 0, 5.0), lendable("b", 0, 1.0)], 1, None, 0, ["b"]),  # longest asleep
    ([lendable("a", name="A10")], 1, "H100", 0, None),                   # gpu_type
    ([lendable("a"), lendable("b", index=1)], 2, None, 0, ["a", "b"]),
    ([lendable("a")], 2, None, 0, None),                                 # too few
])
def test_pick_loan(gpus, count, gpu_type, priority, loan):
    assert pick_loan(gpus, count, gpu_type, priority) == loan


def tenant(rid: str, state: ReplicaState, in_flight: int = 0, busy: bool = False,
           can_sleep: bool = True, priority: int = 0) -> CoTenant:
    return CoTenant(rid, state, in_flight, busy, can_sleep, priority)


@pytest.mark.parametrize(("cotenants", "plan"), [
    ([], Reclaim()),                                                      # GPU all its own
    ([tenant("b", S.SLEEPING)], Reclaim()),                               # asleep: wake now
    ([tenant("b", S.SLEEPING, busy=True)], Reclaim(wait=True)),           # still falling asleep
    ([tenant("b", S.READY)], Reclaim(sleep=("b",), wait=True)),           # idle: to sleep
    ([tenant("b", S.READY, can_sleep=False)], Reclaim(stop=("b",), wait=True)),  # no tier
    # calls in flight: put to sleep all the same (they finish; new ones wait), unless of
    # higher priority than the sleeper: then waited for
    ([tenant("b", S.READY, in_flight=1)], Reclaim(sleep=("b",), wait=True)),
    ([tenant("b", S.READY, in_flight=1, can_sleep=False)], Reclaim(stop=("b",), wait=True)),
    ([tenant("b", S.READY, in_flight=1, priority=1)], Reclaim(wait=True)),
    ([tenant("b", S.READY, priority=1)], Reclaim(sleep=("b",), wait=True)),  # idle: to sleep
    ([tenant("b", S.STARTING)], Reclaim(wait=True)),
    ([tenant("b", S.DRAINING)], Reclaim(wait=True)),                      # going: wait
])
def test_plan_reclaim(cotenants, plan):
    assert plan_reclaim(cotenants, priority=0) == plan


@pytest.mark.parametrize(("gpus", "owners", "loans", "partners"), [
    (["g"], {"g": "s"}, {}, set()),                                    # its own, not lent
    (["g"], {"g": "s"}, {"g": "b"}, {"b"}),                            # lent to b
    (["g"], {"g": "o"}, {"g": "s"}, {"o"}),                            # borrowed from o
    (["g", "h"], {"g": "s", "h": "s"}, {"g": "b", "h": "c"}, {"b", "c"}),
    (["g"], {}, {}, set()),  # a memory share: sharers of g run side by side, none lent
])
def test_lending_partners(gpus, owners, loans, partners):
    assert lending_partners("s", gpus, owners, loans) == partners


SLEEPY = {"sleep": {"after_s": 0.3, "wake_timeout_s": 5}, "idle_timeout_s": 60,
          "gpus": 1, "env": {"LOAD_S": "1", "WAKE_S": "0.2"}}
AWAKE = {**SLEEPY, "sleep": {"after_s": 30, "wake_timeout_s": 5}}  # sleeps only when asked


async def settled_asleep(pa):
    """a's one replica, once loaded and settled asleep (its sleep call has gone out)."""
    await wait_for(pa, lambda: ready_count(pa) == 1, what="a loaded")
    [ra] = pa.replicas.values()
    await wait_for(pa, lambda: ra.state is S.SLEEPING, what="a asleep")
    await asyncio.sleep(0.3)
    return ra


@contextlib.asynccontextmanager
async def calling(client, pb, names: tuple[str, ...],
                  answered: Callable[[str, int], object] = lambda name, status: None):
    """One caller per name, each calling its endpoint's /sleep?s=0.2 over and over (and
    telling `answered`): the first until b has a call in flight, then the others too, so that
    their calls overlap. All cancelled on exit."""
    async def caller(name: str) -> None:
        while True:
            resp = await client.get(f"/invoke/{name}/sleep?s=0.2", headers=ADMIN)
            answered(name, resp.status)

    callers = [asyncio.create_task(caller(names[0]))]
    try:
        await wait_for(pb, lambda: any(r.in_flight for r in pb.replicas.values()),
                       what="b busy on the lent GPU")
        callers += [asyncio.create_task(caller(name)) for name in names[1:]]
        yield
    finally:
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)


async def lender_asleep(api, borrower: dict):
    """One GPU: "a" loaded and settled asleep (a lender), "b" (`borrower`'s fields) with no
    replica yet: (harness, client, b's pool, a's replica)."""
    h, client = await api({"a": endpoint("a", min_replicas=1, **SLEEPY),
                           "b": endpoint("b", min_replicas=0, **borrower)}, gpus=1)
    pa, pb = h.reconciler.pool("a"), h.reconciler.pool("b")
    ra = await settled_asleep(pa)
    return h, client, pb, ra


async def test_two_endpoints_switch_one_gpu_by_sleep_and_lending(api):
    h, client, pb, ra = await lender_asleep(api, AWAKE)  # b sleeps when asked
    # b has no GPU free: it borrows a's instead of stopping a.
    resp = await client.get("/invoke/b/echo", headers=ADMIN)
    assert resp.status == 200
    [rb] = pb.replicas.values()
    assert rb.gpus == ra.gpus and ra.state is S.SLEEPING
    assert h.reconciler.allocator.loans() == {ra.gpus[0]: rb.id}
    assert rb.state is S.READY  # awake on the lent GPU
    [gpu] = (await (await client.get("/v1/gpus", headers=ADMIN)).json())["gpus"]
    assert (gpu["replica"], gpu["lent_to"]) == (ra.id, rb.id)
    # a is called: b is put to sleep first (it would not on its own), then a wakes.
    resp = await client.get("/invoke/a/echo", headers=ADMIN)
    assert resp.status == 200 and resp.headers["X-Berth-Replica"] == ra.id
    assert rb.state is S.SLEEPING
    # And back: b wakes on the GPU it borrowed, a asleep by then (on its own or asked).
    resp = await client.get("/invoke/b/echo", headers=ADMIN)
    assert resp.status == 200 and resp.headers["X-Berth-Replica"] == rb.id
    assert ra.state is S.SLEEPING
    kinds = [e.kind for e in await h.store.events()]
    assert kinds.count("start") == 2 and kinds.count("gpu_lent") == 1  # nothing restarted
    assert kinds.count("gpu_reclaim") >= 1 and kinds.count("wake") == 2
    # The borrower stops: the loan ends, the lender keeps its GPU.
    await h.reconciler.remove_endpoint("b")
    for _ in range(100):
        if not h.reconciler.allocator.loans():
            break
        await asyncio.sleep(0.05)
    assert h.reconciler.allocator.loans() == {} and h.reconciler.allocator.owners() == {
        ra.gpus[0]: ra.id}


async def test_a_borrower_with_a_call_in_flight_is_waited_for(api):
    _, client, pb, ra = await lender_asleep(api, SLEEPY)
    slow = asyncio.create_task(client.get("/invoke/b/sleep?s=1.0", headers=ADMIN))
    await wait_for(pb, lambda: any(r.in_flight for r in pb.replicas.values()),
                   what="b busy on the lent GPU")
    resp = await client.get("/invoke/a/echo", headers=ADMIN)  # waits for b's call to end
    assert resp.status == 200 and (await slow).status == 200
    assert resp.headers["X-Berth-Replica"] == ra.id


async def test_a_borrower_never_idle_gives_the_gpu_back_for_a_wake(api):
    # b always has a call in flight (two callers in turn, overlapping). Waited for until idle,
    # it kept the GPU for ever and a's call timed out; now it is put to sleep: its calls in
    # flight finish, its new ones wait for their turn, and a wakes.
    _, client, pb, ra = await lender_asleep(api, SLEEPY)
    answered: list[int] = []
    async with calling(client, pb, ("b", "b"), lambda _, status: answered.append(status)):
        resp = await asyncio.wait_for(client.get("/invoke/a/echo", headers=ADMIN), 10)
        assert resp.status == 200 and resp.headers["X-Berth-Replica"] == ra.id
    assert answered and set(answered) == {200}  # b's calls were served, none cut


async def test_two_busy_endpoints_on_one_gpu_take_turns(api):
    # Both endpoints always have calls. Each wake puts the other to sleep; without turns the
    # first endpoint of a reconcile pass took the GPU back every time the other had put it to
    # sleep, and the other never woke (found in review).
    _, client, pb, _ra = await lender_asleep(api, SLEEPY)
    served: dict[str, list[float]] = {"a": [], "b": []}

    def answered(name: str, status: int) -> None:
        if status == 200:
            served[name].append(time.monotonic())

    def turns() -> list[str]:  # who served, in time order, runs of one name as one turn
        order = sorted((t, name) for name, times in served.items() for t in times)
        return [name for i, (_, name) in enumerate(order) if i == 0 or order[i - 1][1] != name]

    async with calling(client, pb, ("b", "b", "a", "a"), answered), asyncio.timeout(20):
        while len(turns()) < 4:  # b, a, b, a: each woke while the other was busy
            await asyncio.sleep(0.1)
    assert turns()[:4] == ["b", "a", "b", "a"]


async def test_a_sleeper_whose_calls_wait_lends_its_gpu_to_nobody(api):
    # b has no sleep tier and comes first in each pass. Stopped so that a can wake, b started
    # another replica for its own waiting calls and borrowed a's GPU straight back, every
    # time, before a's part of the pass could wake a (found in review).
    no_tier = {"idle_timeout_s": 60, "gpus": 1, "env": {"LOAD_S": "0.5"}}
    h, client = await api({"b": endpoint("b", min_replicas=0, **no_tier),
                           "a": endpoint("a", min_replicas=1, **SLEEPY)}, gpus=1)
    pa, pb = h.reconciler.pool("a"), h.reconciler.pool("b")
    ra = await settled_asleep(pa)
    async with calling(client, pb, ("b", "b")):
        resp = await asyncio.wait_for(client.get("/invoke/a/echo", headers=ADMIN), 15)
        assert resp.status == 200 and resp.headers["X-Berth-Replica"] == ra.id


async def test_a_sharer_wakes_beside_the_other_sharer_of_its_gpu(api):
    # Sharers of one GPU's memory run side by side: waking one never puts the other to sleep
    # (it used to, as if the other had borrowed the GPU).
    h, client = await api({"a": endpoint("a", min_replicas=1, gpu_memory="400m", **SLEEPY),
                           "b": endpoint("b", min_replicas=1, gpu_memory="400m", **AWAKE)},
                          gpus=1)
    pa, pb = h.reconciler.pool("a"), h.reconciler.pool("b")
    await wait_for(pb, lambda: ready_count(pb) == 1, what="b loaded")
    await wait_for(pa, lambda: any(r.state is S.SLEEPING for r in pa.replicas.values()),
                   what="a asleep")
    [ra], [rb] = pa.replicas.values(), pb.replicas.values()
    assert ra.gpus == rb.gpus  # one GPU, shared
    await asyncio.sleep(0.3)  # a's sleep call has gone out: it is settled
    resp = await client.get("/invoke/a/echo", headers=ADMIN)
    assert resp.status == 200 and resp.headers["X-Berth-Replica"] == ra.id
    assert rb.state is S.READY
    assert "gpu_reclaim" not in [e.kind for e in await h.store.events()]


async def test_a_borrower_still_being_created_is_waited_for(api):
    # A borrower holds the lent GPU from the moment it is given it, while the engine still
    # creates its container: the lender must not wake on that GPU meanwhile.
    h, client, pb, ra = await lender_asleep(api, SLEEPY)
    creates = SlowCreates(h.runtime)  # the engine takes its time over b's create
    call_b = asyncio.create_task(client.get("/invoke/b/echo", headers=ADMIN))
    assert await creates.entered()
    [rb] = pb.replicas.values()
    assert rb.state is S.PENDING and h.reconciler.allocator.loans() == {ra.gpus[0]: rb.id}
    call_a = asyncio.create_task(client.get("/invoke/a/echo", headers=ADMIN))
    await asyncio.sleep(0.5)  # (passes run every 0.1 s)
    assert ra.state is S.SLEEPING  # not woken beside b's container coming up
    creates.go_on.set()
    assert (await call_b).status == 200
    resp = await call_a
    assert resp.status == 200 and resp.headers["X-Berth-Replica"] == ra.id
    # Whichever call was served first (b may be put to sleep for a's turn and woken again
    # for its own: CI saw that order once in three runs), the GPU is never awake for both.
    assert S.SLEEPING in (ra.state, rb.state), (ra.state, rb.state)
