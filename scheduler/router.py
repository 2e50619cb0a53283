"""Capacity for the data plane: a slot on a ready replica, now or after waiting for one.

The data plane never starts or stops containers: it asks here, and a call that must wait
raises the endpoint's demand and kicks the reconciler, which starts replicas at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from berth.scheduler.policy import desired_replicas
from berth.scheduler.pool import EndpointPool, EndpointUnavailable, Waiter
from berth.scheduler.reconciler import Reconciler
from berth.scheduler.replica import Replica, ReplicaState


@dataclass
class CapacityError(Exception):
    """No slot can be had; status/code/message are what the client is told."""

    status: int
    code: str
    message: str
    retry_after: int | None = None

    def __str__(self) -> str:
        return self.message


class Router:
    """Hands out replica slots; every slot acquired must be given back with `release`."""

    def __init__(self, reconciler: Reconciler, clock: Callable[[], float] = time.time) -> None:
        self.reconciler = reconciler
        self.clock = clock

    def pool(self, name: str) -> EndpointPool:
        pool = self.reconciler.pools.get(name)
        if pool is None or pool.removed:
            raise CapacityError(404, "endpoint_not_found", f"no endpoint named {name!r}")
        return pool

    async def acquire(self, pool: EndpointPool, pinned: str | None = None,
                      exclude: frozenset[str] = frozenset()) -> Replica:
        """A slot, at once or after waiting in the endpoint's FIFO queue."""
        spec = pool.spec
        if pool.error:
            raise CapacityError(503, "endpoint_error", f"endpoint {pool.name} cannot run: "
                                f"{pool.error}", retry_after=5)
        if pinned is not None and pinned not in pool.replicas:
            raise CapacityError(404, "replica_not_found",
                                f"endpoint {pool.name} has no replica {pinned!r}")
        replica = pool.take(pinned, exclude)
        if replica is not None:
            return replica
        runtime = self.reconciler.runtime
        if not runtime.engine_up:  # waiting would only time out: no replica can start
            raise CapacityError(503, "docker_unavailable", f"endpoint {pool.name} has no free "
                                f"replica and none can start: the Docker engine is "
                                f"unreachable ({runtime.down_reason})", retry_after=5)
        if pool.waiting >= spec.queue_limit:
            raise CapacityError(429, "queue_full", f"endpoint {pool.name} has {pool.waiting} "
                                f"calls waiting (queue_limit {spec.queue_limit})", retry_after=1)
        waiter = Waiter(asyncio.get_running_loop().create_future(), pinned)
        pool.queue.append(waiter)
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
            raise CapacityError(503, "no_capacity", f"no replica of {pool.name} had a free slot "
                                f"within startup_timeout_s={timeout:g}", retry_after=5) from None
        except EndpointUnavailable as exc:
            raise CapacityError(503, "endpoint_error",
                                f"endpoint {pool.name} cannot run: {exc}", retry_after=5) from None
        except asyncio.CancelledError:  # the client left while waiting
            if _granted(waiter):
                await pool.release(waiter.slot.result(), self.clock())
            raise
        finally:
            if waiter in pool.queue:
                pool.queue.remove(waiter)
            if not waiter.slot.done():
                waiter.slot.cancel()

    @staticmethod
    def _needs_more(pool: EndpointPool) -> bool:
        spec = pool.spec
        wanted = desired_replicas(pool.demand(), spec.concurrency, spec.min_replicas,
                                  spec.max_replicas)
        return wanted > pool.count(ReplicaState.PENDING, ReplicaState.STARTING,
                                   ReplicaState.READY)

    async def release(self, pool: EndpointPool, replica: Replica) -> None:
        await pool.release(replica, self.clock())


def _granted(waiter: Waiter) -> bool:
    slot = waiter.slot
    return slot.done() and not slot.cancelled() and slot.exception() is None
