"""An endpoint pool's slots and the router's leases, without Docker: round-robin, pinning,
concurrency, FIFO hand-over of freed slots, and a release that can only happen once."""

from __future__ import annotations

import asyncio

import pytest

from berth.daemon.config import EndpointSpec
from berth.scheduler.endpoint import Endpoint
from berth.scheduler.errors import EndpointFailing
from berth.scheduler.pool import EndpointPool, Waiter
from berth.scheduler.replica import Replica, ReplicaState
from berth.scheduler.router import Lease

S = ReplicaState


def pool_of(states: list[ReplicaState], concurrency: int = 1) -> EndpointPool:
    spec = EndpointSpec.model_validate({"name": "p", "image": "x",
                                        "concurrency": concurrency})
    pool = EndpointPool(Endpoint(spec, "api"))
    for i, state in enumerate(states):
        pool.replicas[f"r{i}"] = Replica(id=f"r{i}", endpoint="p", generation=1, state=state,
                                         created_at=0.0)
    return pool


@pytest.mark.parametrize(("states", "concurrency", "pinned", "takes"), [
    ([S.READY, S.READY, S.READY], 1, None, ["r0", "r1", "r2", None]),  # round-robin, then full
    ([S.READY, S.READY], 2, None, ["r0", "r1", "r0", "r1", None]),     # concurrency 2 each
    ([S.STARTING, S.READY, S.DRAINING], 1, None, ["r1", None]),       # only ready take calls
    ([S.READY, S.READY], 2, "r1", ["r1", "r1", None]),                 # pinned: that one only
    ([S.READY, S.STARTING], 1, "r1", [None]),                           # pinned, not ready
    ([S.READY], 1, "nope", [None]),                                     # pinned, unknown
    ([], 1, None, [None]),
])
def test_take(states, concurrency, pinned, takes):
    pool = pool_of(states, concurrency)
    got = []
    for _ in takes:
        replica = pool.take(pinned)
        got.append(replica.id if replica else None)
    assert got == takes
    assert pool.demand() == sum(1 for t in takes if t)


@pytest.mark.parametrize(("state", "owed"), [
    (S.READY, False), (S.DRAINING, True),
    (S.SLEEPING, True),  # a call that slipped in as it went to sleep: the sleep waits for it
])
def test_the_last_call_out_is_told_to_whoever_waits_for_it(state, owed):
    pool = pool_of([S.READY])
    replica = pool.take(None)
    assert replica is not None
    replica.state = state
    assert pool.give_back(replica, 1.0) is owed


async def test_a_released_slot_goes_to_the_oldest_waiter_that_can_use_it():
    pool = pool_of([S.READY, S.READY])
    first, second = pool.take(), pool.take()
    assert first is not None and second is not None
    loop = asyncio.get_running_loop()
    pinned_to_first = Waiter(loop.create_future(), pinned=first.id)
    anyone = Waiter(loop.create_future())
    pool.queue.extend([Waiter(loop.create_future(), pinned=second.id), pinned_to_first, anyone])
    assert pool.waiting == 3
    await pool.release(first, now=10.0)
    assert pinned_to_first.slot.result() is first  # the pinned-elsewhere one keeps waiting
    assert not anyone.slot.done() and pool.waiting == 2
    assert first.last_call_at == 10.0 and first.in_flight == 1


async def test_a_lease_releases_once_however_often_it_is_told():
    pool = pool_of([S.READY])
    replica = pool.take()
    assert replica is not None
    lease = Lease(pool, replica, clock=lambda: 5.0)
    async with lease:
        assert replica.in_flight == 1
        await lease.release()  # early, as the dispatcher does before a retry backoff
        assert replica.in_flight == 0
    await lease.release()
    assert replica.in_flight == 0 and lease.released
    with pytest.raises(RuntimeError, match="not taken"):  # only a bug could get here
        await pool.release(replica, now=6.0)


async def test_waiters_hear_why_the_endpoint_cannot_serve():
    pool = pool_of([])
    waiter = Waiter(asyncio.get_running_loop().create_future())
    pool.queue.append(waiter)
    pool.fail_waiters("image missing")
    with pytest.raises(EndpointFailing, match="image missing"):
        waiter.slot.result()
    assert pool.waiting == 0


def test_the_dispatcher_and_the_proxy_give_slots_back_in_one_place_each():
    # Issue 9: a slot is a lease, released where its `async with` ends and nowhere else.
    import inspect

    from berth.daemon import proxy
    from berth.scheduler import dispatch

    for module, holder in ((dispatch, "async with lease:"),
                           (proxy, "async with router.acquire(")):
        source = inspect.getsource(module)
        assert ".release(" not in source, module.__name__
        assert source.count(holder) == 1, module.__name__


def test_the_pool_reads_its_endpoint_and_cannot_change_it():
    # Issue 9: the pool owns slots, queue and demand; the endpoint is the reconciler's.
    pool = pool_of([])
    spec = pool.spec
    for name, value in (("spec", spec), ("error", "no"), ("generation", 2), ("removed", True),
                        ("failures", 3), ("next_start_at", 1.0), ("source", "config")):
        with pytest.raises(AttributeError):
            setattr(pool, name, value)
    pool.endpoint.count_failure(None, 100.0)
    assert (pool.failures, pool.next_start_at) == (1, 101.0)


@pytest.mark.parametrize(("states", "serves"), [
    ([S.READY, S.FAILED], True),  # a roll to a bad image: the old replica still serves
    ([S.FAILED], False),
    ([], False),
])
def test_a_start_error_fails_calls_only_when_no_replica_is_ready(states, serves):
    from berth.scheduler.router import Router

    pool = pool_of(states)
    pool.endpoint.error = "image x:2 not found"
    router = Router(reconciler=None)  # type: ignore[arg-type]  (free_slot reads the pool)
    if serves:
        assert router.free_slot(pool, None, frozenset()) is not None
    else:
        with pytest.raises(EndpointFailing, match="not found"):
            router.free_slot(pool, None, frozenset())
