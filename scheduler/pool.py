"""An endpoint's replica pool: its live replicas, their slots, the calls waiting for one and
the demand they make. What the endpoint is (spec, generation, error, backoff) is the
reconciler's `Endpoint` (scheduler.endpoint); the pool only reads it.

Every field here changes only through the methods here. Who calls which: the reconciler adds
replicas (add) and tells waiters when the endpoint cannot serve (fail_waiters); a replica's
ReplicaLifecycle forgets it at its end (forget); the router, through a Lease, the slots and
the wait queue (take, release, enqueue, leave, dispatch); the dispatcher the async backlog
(set_backlog)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from berth.daemon.config import EndpointSpec
from berth.scheduler.endpoint import Endpoint, StartPhases, median_phases
from berth.scheduler.errors import EndpointFailing
from berth.scheduler.policy import pick_replica
from berth.scheduler.replica import Replica, ReplicaState

# States whose owner waits for the calls still in flight to end (drain, sleep)
WAITS_FOR_CALLS = frozenset({ReplicaState.DRAINING, ReplicaState.SLEEPING})


@dataclass(eq=False)
class Waiter:
    """A call queued for a slot; `pinned` names the one replica it may run on."""

    slot: asyncio.Future[Replica]
    pinned: str | None = None


@dataclass
class EndpointPool:
    """One endpoint's replicas, slots and waiting calls. Replicas in it change state only
    through their lifecycle; the endpoint's own state is read from `endpoint`.

    `changed` is notified on every move into ready, failed or stopped, so callers waiting for
    capacity (the data plane, tests, shutdown) wake without polling.
    """

    endpoint: Endpoint
    replicas: dict[str, Replica] = field(default_factory=dict)
    queue: deque[Waiter] = field(default_factory=deque)  # calls waiting for a slot, FIFO
    turn: int = 0  # round-robin position
    backlog: int = 0  # async tasks queued behind the one waiting for a slot (the dispatcher's)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    # --- the endpoint, read-only here ---------------------------------------------------------

    @property
    def spec(self) -> EndpointSpec:
        return self.endpoint.spec

    @property
    def name(self) -> str:
        return self.endpoint.spec.name

    @property
    def source(self) -> str:
        return self.endpoint.source

    @property
    def generation(self) -> int:
        return self.endpoint.generation

    @property
    def error(self) -> str | None:
        return self.endpoint.error

    @property
    def failures(self) -> int:
        return self.endpoint.failures

    @property
    def next_start_at(self) -> float:
        return self.endpoint.next_start_at

    @property
    def removed(self) -> bool:
        return self.endpoint.removed

    @property
    def created_at(self) -> float:
        return self.endpoint.created_at

    @property
    def waiting(self) -> int:
        return sum(1 for w in self.queue if not w.slot.done())

    def demand(self) -> int:
        """Calls and tasks in flight + calls waiting + async tasks queued."""
        return sum(r.in_flight for r in self.replicas.values()) + self.waiting + self.backlog

    # --- slots: every call holds one from start to end ---------------------------------------

    def take(self, pinned: str | None = None,
             exclude: frozenset[str] = frozenset()) -> Replica | None:
        """A slot on a ready replica (round-robin, or the pinned one), or None if none is free."""
        if pinned is not None:
            replica = self.replicas.get(pinned)
            if (replica is None or replica.state is not ReplicaState.READY
                    or replica.in_flight >= self.spec.concurrency):
                return None
        else:
            replica = pick_replica(self.replicas.values(), self.spec.concurrency,
                                   self.turn, exclude)
            if replica is None:
                return None
            self.turn += 1
        replica.in_flight += 1
        return replica

    async def release(self, replica: Replica, now: float) -> None:
        """Give a slot back; the first waiters that can use it get it at once. Only a Lease
        calls this, once (router.Lease)."""
        if self.give_back(replica, now):
            await self.notify()

    def give_back(self, replica: Replica, now: float) -> bool:
        """`release` without the await every call would pay: True when a drain or a sleep
        waits for this slot (the last call out), and the caller must `notify()`."""
        if replica.in_flight <= 0:
            raise RuntimeError(f"replica {replica.id}: a slot released that was not taken")
        replica.in_flight -= 1
        replica.last_call_at = now
        if self.queue:
            self.dispatch()
        return replica.in_flight == 0 and replica.state in WAITS_FOR_CALLS

    # --- replicas: added by the reconciler, forgotten by their lifecycle ---------------------

    def add(self, replica: Replica) -> None:
        self.replicas[replica.id] = replica

    def forget(self, replica: Replica) -> None:
        self.replicas.pop(replica.id, None)

    # --- calls waiting ----------------------------------------------------------------------

    def enqueue(self, waiter: Waiter) -> None:
        """A call waits, last in line, for a slot."""
        self.queue.append(waiter)

    def leave(self, waiter: Waiter) -> None:
        """A call stops waiting (served, timed out, or its client left)."""
        if waiter in self.queue:
            self.queue.remove(waiter)

    def set_backlog(self, count: int) -> None:
        """Async tasks queued behind the one the dispatcher is placing: demand too."""
        self.backlog = max(0, count)

    def fail_waiters(self, reason: str) -> None:
        """Tell every queued call the endpoint cannot serve it (instead of letting it time out)."""
        for waiter in self.queue:
            if not waiter.slot.done():
                waiter.slot.set_exception(EndpointFailing(reason))
        self.queue.clear()

    def dispatch(self) -> None:
        """Hand free slots to queued calls, oldest first."""
        for waiter in list(self.queue):
            if waiter.slot.done():
                self.queue.remove(waiter)
                continue
            replica = self.take(waiter.pinned)
            if replica is not None:
                self.queue.remove(waiter)
                waiter.slot.set_result(replica)

    def count(self, *states: ReplicaState) -> int:
        return sum(1 for r in self.replicas.values() if r.state in states)

    def status(self) -> str:
        """One word for people: error, ready, starting, pending, stopping or idle."""
        S = ReplicaState
        if self.error:
            return "error"
        for word, state in (("ready", S.READY), ("sleeping", S.SLEEPING),
                            ("starting", S.STARTING),
                            ("pending", S.PENDING), ("stopping", S.DRAINING)):
            if self.count(state):
                return word
        return "idle"

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def describe(self, gpu_names: dict[str, Any]) -> dict[str, Any]:
        """Spec plus live status, as the API shows it."""
        return {
            "name": self.name,
            "source": self.source,
            "generation": self.generation,
            "status": self.status(),
            "error": self.error,
            "spec": self.spec.model_dump(mode="json"),
            "replicas": [describe_replica(r, gpu_names) for r in self.replicas.values()],
            "in_flight": sum(r.in_flight for r in self.replicas.values()),
            "queued": self.waiting,
            "starts": describe_starts(list(self.endpoint.starts)),
        }


def describe_starts(starts: list[StartPhases]) -> dict[str, Any] | None:
    """The last start's phases and each phase's median over the last few (None: no start
    since berthd started)."""
    if not starts:
        return None
    last, median = starts[-1], median_phases(starts)
    return {"last": {**asdict(last), "total_s": last.total_s},
            "median": {**asdict(median), "total_s": median.total_s}, "count": len(starts)}


def describe_replica(replica: Replica, gpu_names: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": replica.id,
        "state": replica.state.value,
        "generation": replica.generation,
        "container_id": replica.container_id,
        "address": replica.address,
        "gpus": [gpu_names.get(u, {"uuid": u}) for u in replica.gpus],
        "in_flight": replica.in_flight,
        "created_at": replica.created_at,
        "started_at": replica.started_at,
        "ready_at": replica.ready_at,
        "last_call_at": replica.last_call_at,
        "failures": replica.failures,
        "reason": replica.reason,
    }


def replica_containers(pools: Iterable[EndpointPool]) -> dict[str, str]:
    """Container id -> replica id, for every replica that has a container."""
    return {r.container_id: r.id for p in pools for r in p.replicas.values() if r.container_id}
