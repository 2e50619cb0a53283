"""Capacity for the data plane: a slot on a ready replica, now or after waiting for one.

Owns nothing of its own: it takes and gives back slots of the endpoint's pool through the
pool's methods, as Leases (the only way a slot is released). The data plane never starts or
stops containers: a call that must wait raises the endpoint's demand and kicks the
reconciler, which starts replicas at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from berth.scheduler.errors import (
    EndpointFailing,
    EndpointNotFound,
    EngineUnavailable,
    NoCapacity,
    QueueFull,
    ReplicaNotFound,
)
from berth.scheduler.policy import desired_replicas
from berth.scheduler.pool import EndpointPool, Waiter
from berth.scheduler.reconciler import Reconciler
from berth.scheduler.replica import Replica, ReplicaState


@dataclass(eq=False, slots=True)
class Lease:
    """One call's slot on one replica, from acquire until release. Releasing twice is
    harmless (the second does nothing), so a slot can never be given back twice; as an
    async context manager it is released on exit."""

    pool: EndpointPool
    replica: Replica
    clock: Callable[[], float]
    released: bool = False

    async def release(self) -> None:
        if self.give_back():
            await self.pool.notify()

    def give_back(self) -> bool:
        """The slot back, once, without awaiting: True when a drain waits for it and
        `pool.notify()` is owed."""
        if self.released:
            return False
        self.released = True
        return self.pool.give_back(self.replica, self.clock())

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class Acquiring:
    """`router.acquire(...)`: a lease taken on entry and released on exit (a class, not an
    asynccontextmanager: every model call goes through it, and a generator costs more)."""

    __slots__ = ("_exclude", "_lease", "_pinned", "_pool", "_router")

    def __init__(self, router: Router, pool: EndpointPool, pinned: str | None,
                 exclude: frozenset[str]) -> None:
        self._router, self._pool, self._pinned, self._exclude = router, pool, pinned, exclude
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        router, pool = self._router, self._pool
        replica = router.free_slot(pool, self._pinned, self._exclude)  # mostly: no await
        self._lease = Lease(pool, replica, router.clock) if replica is not None else \
            await router.lease(pool, self._pinned, self._exclude)
        return self._lease

    async def __aexit__(self, *exc: object) -> None:
        if self._lease is not None and self._lease.give_back():
            await self._lease.pool.notify()  # a drain waits for this slot


class Router:
    """Hands out replica slots as leases: `async with router.acquire(pool) as lease:`.

    Refusals are scheduler errors (EndpointNotFound, ReplicaNotFound, QueueFull, NoCapacity,
    EndpointFailing, EngineUnavailable), never HTTP."""

    def __init__(self, reconciler: Reconciler, clock: Callable[[], float] = time.time) -> None:
        self.reconciler = reconciler
        self.clock = clock

    def pool(self, name: str) -> EndpointPool:
        pool = self.reconciler.pool(name)
        if pool is None:
            raise EndpointNotFound(f"no endpoint named {name!r}")
        return pool

    def refused(self, replica: Replica) -> None:
        """A replica refused a connection: the reconciler should look at it now."""
        self.reconciler.kick()

    def acquire(self, pool: EndpointPool, pinned: str | None = None,
                exclude: frozenset[str] = frozenset()) -> Acquiring:
        """`async with router.acquire(pool) as lease:` a slot, released on exit."""
        return Acquiring(self, pool, pinned, exclude)

    async def lease(self, pool: EndpointPool, pinned: str | None = None,
                    exclude: frozenset[str] = frozenset()) -> Lease:
        """A lease on a slot, at once or after waiting in the endpoint's FIFO queue, for a
        holder that hands it on (the dispatcher's pump to the task's runner)."""
        return Lease(pool, await self._slot(pool, pinned, exclude), self.clock)

    def free_slot(self, pool: EndpointPool, pinned: str | None,
                  exclude: frozenset[str]) -> Replica | None:
        """A slot taken at once, or None when the call must wait (see `_slot`). A start
        error fails calls only when no replica is ready to serve them (a roll to a bad image
        leaves the old ones serving)."""
        if pool.error and not pool.count(ReplicaState.READY):
            raise EndpointFailing(f"endpoint {pool.name} cannot run: {pool.error}")
        if pinned is not None and pinned not in pool.replicas:
            raise ReplicaNotFound(f"endpoint {pool.name} has no replica {pinned!r}")
        return pool.take(pinned, exclude)

    async def _slot(self, pool: EndpointPool, pinned: str | None,
                    exclude: frozenset[str]) -> Replica:
        spec = pool.spec
        replica = self.free_slot(pool, pinned, exclude)
        if replica is not None:
            return replica
        runtime = self.reconciler.runtime
        if not runtime.engine_up:  # waiting would only time out: no replica can start
            raise EngineUnavailable(f"endpoint {pool.name} has no free replica and none can "
                                    f"start: the Docker engine is unreachable "
                                    f"({runtime.down_reason})")
        if pool.waiting >= spec.queue_limit:
            raise QueueFull(f"endpoint {pool.name} has {pool.waiting} calls waiting "
                            f"(queue_limit {spec.queue_limit})")
        waiter = Waiter(asyncio.get_running_loop().create_future(), pinned)
        pool.enqueue(waiter)
        if self._needs_more(pool):
            self.reconciler.kick()  # scale up now, not at the next tick
        return await self._wait(pool, waiter)

    async def _wait(self, pool: EndpointPool, waiter: Waiter) -> Replica:
        timeout = pool.spec.startup_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.slot), timeout)
        except TimeoutError:
            if _granted(waiter):  # the slot came in the same instant as the deadline
                return waiter.slot.result()
            raise NoCapacity(f"no replica of {pool.name} had a free slot within "
                             f"startup_timeout_s={timeout:g}") from None
        except EndpointFailing as exc:
            raise EndpointFailing(f"endpoint {pool.name} cannot run: {exc}") from None
        except asyncio.CancelledError:  # the client left while waiting
            if _granted(waiter):
                await pool.release(waiter.slot.result(), self.clock())
            raise
        finally:
            pool.leave(waiter)
            if not waiter.slot.done():
                waiter.slot.cancel()

    @staticmethod
    def _needs_more(pool: EndpointPool) -> bool:
        spec = pool.spec
        if pool.count(ReplicaState.SLEEPING):
            return True  # a sleeper to wake: the reconciler decides which, now
        wanted = desired_replicas(pool.demand(), spec.concurrency, spec.min_replicas,
                                  spec.max_replicas)
        return wanted > pool.count(ReplicaState.PENDING, ReplicaState.STARTING,
                                   ReplicaState.READY)


def _granted(waiter: Waiter) -> bool:
    slot = waiter.slot
    return slot.done() and not slot.cancelled() and slot.exception() is None
