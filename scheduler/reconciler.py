"""The reconciler: keeps each endpoint at its desired replicas.

It owns the endpoints (each an `Endpoint`: spec, generation, error, backoff, removal, and
the `EndpointPool` of its replicas) and decides *when* replicas start and stop: passes (every
reconcile_interval_s and at once on `kick`), apply (config and API), adoption at start,
eviction between endpoints. Each replica's life (start, readiness, liveness, failure, drain,
and every state change) is carried out by its own ReplicaLifecycle (scheduler.lifecycle), to
which this module hands the decisions. Decisions themselves are pure functions in
scheduler.policy. Other modules find pools through `pool()`, `live_pools()`, `all_pools()`
and `holds()`; they change endpoints only through the methods here (apply_specs,
put_endpoint, remove_endpoint, secret_changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from berth.daemon.config import EndpointSpec
from berth.gpu import GpuAllocator
from berth.scheduler.endpoint import Endpoint, StartPhases
from berth.scheduler.gpu_moves import GpuMoves
from berth.scheduler.images import ImagePuller
from berth.scheduler.lifecycle import ReplicaLifecycle
from berth.scheduler.policy import (
    desired_replicas,
    plan_replicas,
    plan_sleeps,
    plan_wakes,
)
from berth.scheduler.pool import EndpointPool
from berth.scheduler.probes import Prober
from berth.scheduler.replica import Replica, ReplicaState
from berth.scheduler.runtime import (
    LABEL_ENDPOINT,
    ContainerInfo,
    ContainerNotRemoved,
    DockerRuntime,
    DockerUnavailable,
)
from berth.store import EndpointRecord, EventRecord, Store

log = structlog.get_logger("berth.reconciler")
S = ReplicaState
STORE_RETRY_FIRST_S, STORE_RETRY_MAX_S = 0.05, 2.0  # a failed state write is retried so


# Events that are not about one replica, by their stored kind: the log's stable names.
EVENT_NAMES = {
    "endpoint_created": "endpoint.created", "endpoint_updated": "endpoint.updated",
    "endpoint_removed": "endpoint.removed", "reload": "config.reloaded",
    "reload_refused": "config.reload_refused", "token_created": "token.created",
    "token_revoked": "token.revoked", "secret_set": "secret.set",
    "secret_deleted": "secret.deleted", "orphan_removed": "container.orphan_removed",
}


def event_name(kind: str, replica: str | None) -> str:
    """The stable log event name of a stored event: replica.<kind> for replicas' moves
    (replica.ready, replica.crash, replica.scale_up...), else from EVENT_NAMES."""
    if kind in EVENT_NAMES:
        return EVENT_NAMES[kind]
    return f"replica.{kind}" if replica else f"berthd.{kind}"


@dataclass
class ChangeSummary:
    """What applying a set of specs did, by endpoint name."""

    created: list[str] = field(default_factory=list)
    rolled: list[str] = field(default_factory=list)  # new replicas replace the old ones
    updated: list[str] = field(default_factory=list)  # applied without replacing replicas
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


class Reconciler(GpuMoves):
    """Owns every EndpointPool and the replicas in it."""

    def __init__(self, store: Store, allocator: GpuAllocator, runtime: DockerRuntime,
                 prober: Prober, gpu_mode: str, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.allocator = allocator
        self.runtime = runtime
        self.prober = prober
        self.gpu_mode = gpu_mode
        self.clock = clock
        self._pools: dict[str, EndpointPool] = {}  # by name; removed ones until drained
        self._pass_lock = asyncio.Lock()
        # Endpoint writes (API handlers, a reload) one at a time: a read-modify-write such as
        # PATCH, or a restart, never interleaves with another write of the same endpoint.
        self.endpoint_writes = asyncio.Lock()
        self._kick_task: asyncio.Task[None] | None = None
        self._closed = False
        self._dirty = False
        # Told the name of each endpoint removed (after the store forgot it): Auth drops its
        # tokens from memory.
        self.removal_listeners: list[Callable[[str], None]] = []
        self.event_listeners: list[Callable[[EventRecord], None]] = []
        # Told where each start went (the app's metrics histogram listens).
        self.start_listeners: list[Callable[[str, StartPhases], None]] = []
        self.wake_listeners: list[Callable[[str, float], None]] = []
        self._lives: dict[str, ReplicaLifecycle] = {}  # replica id -> its owner
        # A replica put to sleep for a waking co-tenant -> that co-tenant: it wakes first
        # (gpu_moves: turns on a shared GPU)
        self._turns: dict[str, str] = {}
        self.images = ImagePuller(runtime)  # pre-pulls every endpoint's image

    # --- replicas' owners ----------------------------------------------------------------------

    def _life(self, pool: EndpointPool, replica: Replica) -> ReplicaLifecycle:
        """The lifecycle that owns the replica (made on first need)."""
        life = self._lives.get(replica.id)
        if life is None:
            life = self._lives[replica.id] = ReplicaLifecycle(self, pool, replica)
        return life

    def forget(self, replica: Replica) -> None:
        """A lifecycle is over: its replica left the pool."""
        self._lives.pop(replica.id, None)
        self._turns.pop(replica.id, None)

    def _stop_soon(self, pool: EndpointPool, replica: Replica, reason: str) -> None:
        life = self._life(pool, replica)
        life.stopping = True  # at once, so this pass and the next do not ask again
        life.run(life.stop(reason))

    # --- what callers may know of the pools ---------------------------------------------------

    def pool(self, name: str) -> EndpointPool | None:
        """The endpoint's live pool; None when there is none or it is being removed."""
        pool = self._pools.get(name)
        return None if pool is None or pool.removed else pool

    def live_pools(self) -> list[EndpointPool]:
        """Every endpoint that exists (not those draining after removal)."""
        return [p for p in self._pools.values() if not p.removed]

    def serving(self, model: str) -> EndpointPool | None:
        """The endpoint that serves `model` (model names are unique across endpoints), not
        one draining after removal; None when none does."""
        for pool in self._pools.values():
            if not pool.removed and pool.spec.serves(model):
                return pool
        return None

    def holds(self, name: str) -> bool:
        """Whether the endpoint is still here, removed ones draining included."""
        return name in self._pools

    def all_pools(self) -> list[EndpointPool]:
        """Every pool, removed ones draining included (metrics count their replicas)."""
        return list(self._pools.values())

    async def durably(self, write: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a store write until it succeeds: a full or failing disk stalls a state change
        (said once in the log) instead of stranding it half done. Gives up only at shutdown."""
        delay, stalled = STORE_RETRY_FIRST_S, False
        while True:
            try:
                await write(*args)
                break
            except (sqlite3.Error, OSError) as exc:
                if self._closed:
                    raise
                if not stalled:
                    log.warning("store.write_stalled", error=str(exc),
                                message="state write failed; retrying until it succeeds")
                    stalled = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_S)
        if stalled:
            log.warning("store.write_recovered", message="state writes succeed again")

    async def event(self, kind: str, message: str, endpoint: str | None = None,
                    replica: str | None = None) -> None:
        """Record an event; a store that cannot take it loses the event, never the caller."""
        record = EventRecord(ts=self.clock(), kind=kind, message=message, endpoint=endpoint,
                             replica=replica)
        try:
            record = replace(record, id=await self.store.add_event(record))
        except (sqlite3.Error, OSError) as exc:
            log.warning("event.not_stored", event_kind=kind, error=str(exc))
        for listener in self.event_listeners:  # live followers (GET /v1/events?follow=true)
            listener(record)
        log.info(event_name(kind, replica), message=message, endpoint=endpoint,
                 replica=replica)

    # --- endpoints -----------------------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild pools from the store (endpoints created over the API live only there)."""
        for rec in await self.store.endpoints():
            spec = EndpointSpec.model_validate(rec.spec)
            self._pools[rec.name] = EndpointPool(Endpoint(
                spec, rec.source, rec.generation, rec.error, created_at=rec.created_at))

    async def apply_specs(self, specs: Mapping[str, EndpointSpec], source: str,
                          check: Callable[[], None] | None = None) -> ChangeSummary:
        """Make the endpoints of `source` exactly `specs`; replicas follow in the next passes.
        `check` (it raises to refuse) runs first, under the same lock as the API's endpoint
        writes: none lands between it and the change (a reload's model-name check)."""
        summary = ChangeSummary()
        async with self.endpoint_writes:
            if check is not None:
                check()
            for spec in specs.values():
                await self._apply_one(spec, source, summary)
            for name, pool in list(self._pools.items()):
                if pool.source == source and name not in specs and not pool.removed:
                    await self.remove_endpoint(name)
                    summary.removed.append(name)
        self.images.want(p.spec.image for p in self.live_pools())
        self.kick()
        return summary

    async def put_endpoint(self, spec: EndpointSpec, source: str) -> ChangeSummary:
        """Create or change one endpoint (the API's way in)."""
        summary = ChangeSummary()
        await self._apply_one(spec, source, summary)
        self.images.want([spec.image])
        self.kick()
        return summary

    def secret_changed(self, name: str) -> None:
        """A secret was stored: endpoints waiting for it try again now, not after backoff."""
        for pool in self._pools.values():
            if name in pool.spec.secrets and pool.error:
                pool.endpoint.retry_now()
        self.kick()

    async def remove_endpoint(self, name: str, purge_cache: bool = False) -> None:
        """Delete the endpoint (and its tokens) from the store, then drain and stop its
        replicas; the pool is forgotten once they are gone, with its cache volume when
        `purge_cache`. A restart in between finds no endpoint and removes the replicas as
        orphans (the volume then stays)."""
        pool = self._pools[name]
        await self.store.delete_endpoint(name)  # persist first: the tokens go with it
        pool.endpoint.mark_removed(purge_cache)
        for listener in self.removal_listeners:
            listener(name)
        pool.fail_waiters(f"endpoint {name} was removed")
        await self.event("endpoint_removed", f"endpoint {name} removed", name)
        self.kick()

    async def restart_endpoint(self, name: str) -> int:
        """Replace every replica of the endpoint by a fresh one, as a spec change would:
        a new generation starts first and the old replicas drain once it is ready (or go
        first when no GPU is spare). Returns the new generation (stored before it is used)."""
        pool = self._pools[name]
        generation = pool.generation + 1
        await self._store_endpoint(pool.spec, pool.source, generation)
        pool.endpoint.apply(pool.spec, pool.source, generation)
        await self.event("endpoint_restarted", f"endpoint {name} restarted: rolling to "
                         f"generation {generation}", name)
        self.kick()
        return generation

    async def _apply_one(self, spec: EndpointSpec, source: str, summary: ChangeSummary) -> None:
        """Store the endpoint's new spec, then change the live pool to match (persist first:
        a write cut short never leaves memory ahead of SQLite)."""
        name = spec.name
        pool = self._pools.get(name)
        if pool is not None and not pool.removed and pool.spec == spec and \
                pool.source == source:
            summary.unchanged.append(name)
            return
        generation, kind, message, bucket = self._change_of(pool, spec)
        await self._store_endpoint(spec, source, generation)
        pool = self._pools.get(name)  # a removed one may have been forgotten meanwhile
        if pool is None:
            pool = self._pools[name] = EndpointPool(Endpoint(spec, source,
                                                             created_at=self.clock()))
        pool.endpoint.apply(spec, source, generation)
        getattr(summary, bucket).append(name)
        await self.event(kind, message, name)

    async def _store_endpoint(self, spec: EndpointSpec, source: str, generation: int) -> None:
        await self.store.save_endpoint(EndpointRecord(
            name=spec.name, spec=spec.model_dump(mode="json"), source=source,
            generation=generation, error=None))

    def _change_of(self, pool: EndpointPool | None,
                   spec: EndpointSpec) -> tuple[int, str, str, str]:
        """(generation, event kind, event message, summary bucket) of applying `spec`."""
        name = spec.name
        if pool is None:
            return 1, "endpoint_created", f"endpoint {name} created", "created"
        if pool.removed:  # back before its old replicas finished stopping: roll them
            return (pool.generation + 1, "endpoint_created", f"endpoint {name} created again",
                    "created")
        if pool.spec.runtime_view() != spec.runtime_view():
            generation = pool.generation + 1
            return (generation, "endpoint_updated", f"endpoint {name} changed what replicas "
                    f"run: rolling to generation {generation}", "rolled")
        return (pool.generation, "endpoint_updated",
                f"endpoint {name} settings changed in place", "updated")

    async def _save_endpoint(self, pool: EndpointPool) -> None:
        if pool.removed:  # deleted from the store already; never write it back
            return
        await self.durably(self.store.save_endpoint, EndpointRecord(
            name=pool.name, spec=pool.spec.model_dump(mode="json"), source=pool.source,
            generation=pool.generation, error=pool.error))

    def start_observed(self, pool: EndpointPool, phases: StartPhases) -> None:
        for listener in self.start_listeners:
            listener(pool.name, phases)

    def wake_observed(self, pool: EndpointPool, seconds: float) -> None:
        for listener in self.wake_listeners:
            listener(pool.name, seconds)

    async def set_error(self, pool: EndpointPool, error: str | None) -> None:
        if error is not None:
            pool.fail_waiters(error)
        if pool.error != error:
            pool.endpoint.set_error(error)
            await self._save_endpoint(pool)

    # --- adoption at start -----------------------------------------------------------------

    async def adopt(self) -> None:
        """Keep running containers that match the store; remove the rest; rebuild GPU owners."""
        containers = {c.replica: c for c in await self.runtime.list_managed() if c.replica}
        adopted: set[str] = set()
        for rec in await self.store.replicas(live_only=True):
            replica = Replica.from_record(rec)
            container = containers.get(rec.id)
            pool = self._pools.get(rec.endpoint)
            if (pool and container and container.running and container.id == rec.container_id
                    and replica.state in (S.STARTING, S.READY, S.SLEEPING, S.DRAINING)):
                pool.add(replica)
                adopted.add(replica.id)
                await self.event("adopt", f"adopted running container {container.id[:12]}",
                                 pool.name, replica.id)
                self._resume(pool, replica)
            else:
                replica.state, replica.stopped_at = S.STOPPED, self.clock()
                replica.reason = "container gone when berthd started"
                await self.store.save_replica(replica.record())
        for rid, container in containers.items():
            if rid not in adopted:
                if not await self._remove_orphan(container):
                    continue
                await self.event("orphan_removed",
                                 f"removed container {container.name} unknown to the store",
                                 container.labels.get(LABEL_ENDPOINT), rid)
        await self.allocator.load()
        holders = {*self.allocator.owners().values(), *self.allocator.loans().values(),
                   *(r for share in self.allocator.shares().values() for r in share)}
        for rid in holders - adopted:  # whole GPUs, shares and loans of replicas now gone
            await self.allocator.free(rid)

    def _resume(self, pool: EndpointPool, replica: Replica) -> None:
        life = self._life(pool, replica)
        life.stopping = replica.state is S.DRAINING
        life.run(life.resume())

    # --- a reconcile pass --------------------------------------------------------------------

    def kick(self) -> None:
        """Run a pass as soon as possible; kicks that come while one is queued fold into it."""
        self._dirty = True
        if self._closed or (self._kick_task is not None and not self._kick_task.done()):
            return
        self._kick_task = asyncio.get_running_loop().create_task(self._kicked_passes())

    async def _kicked_passes(self) -> None:
        while self._dirty and not self._closed:
            await asyncio.sleep(0)  # let the kicker finish what it was doing first
            self._dirty = False
            await self.run_pass(check_containers=False)  # the timer's passes do that

    async def run_pass(self, check_containers: bool = True) -> None:
        """A reconcile pass whose errors are logged, never raised (for timers and kicks).
        After shutdown began it does nothing, and a pass cut short by it ends quietly."""
        try:
            await self.reconcile(check_containers)
        except asyncio.CancelledError:
            if not self._closed:
                raise
        except Exception:
            if not self._closed:
                log.exception("reconcile.pass_failed")

    async def reconcile(self, check_containers: bool = True) -> None:
        """One pass over every endpoint. Passes never overlap.

        check_containers: also list the engine's containers to catch exits (one engine call;
        the periodic pass does it, kicks that only react to demand skip it).
        """
        async with self._pass_lock:
            if self._closed:
                return  # shutdown holds or has released the lock: no pass after it
            containers = None
            # Only replicas whose container ran before the listing began can be judged by it:
            # one that started while the engine answered is absent or "created" in the list.
            judged = {r.id for pool in self._pools.values() for r in pool.replicas.values()
                      if r.state in (S.STARTING, S.READY, S.SLEEPING)}
            try:
                if check_containers:
                    containers = await self.runtime.list_managed()
            except DockerUnavailable:
                pass  # the runtime says so once per outage
            except Exception as exc:  # engine hiccup: skip the container check, keep going
                log.warning("reconcile.list_failed", error=str(exc))
            if containers is not None:
                await self._check_containers(containers, judged)
            if not self.runtime.engine_up:  # no replica can start: waiting calls hear it now
                for pool in self._pools.values():
                    pool.fail_waiters(f"the Docker engine is unreachable "
                                      f"({self.runtime.down_reason})")
            for pool in list(self._pools.values()):
                await self._reconcile_pool(pool)

    async def _check_containers(self, containers: list[ContainerInfo],
                                judged: set[str]) -> None:
        """Fail replicas (of `judged`) whose container stopped; remove containers no replica
        owns."""
        by_replica = {c.replica: c for c in containers}
        known: set[str] = set()
        for pool in self._pools.values():
            for replica in list(pool.replicas.values()):
                known.add(replica.id)
                life = self._life(pool, replica)
                if (replica.id not in judged
                        or replica.state not in (S.STARTING, S.READY, S.SLEEPING)
                        or life.stopping):
                    continue  # a stop under way removes the container itself
                container = by_replica.get(replica.id)
                if container is None or not container.running:
                    status = container.status if container else "gone"
                    await life.fail(f"container exited ({status})")
        for container in containers:
            if container.replica not in known:
                await self._remove_orphan(container)

    async def _remove_orphan(self, container: ContainerInfo) -> bool:
        """Remove a container no replica owns; a refusal waits for the next pass to find it
        again (it holds no GPU of berth's: its replica is unknown)."""
        try:
            await self.runtime.remove(container.id, timeout_s=0)
        except ContainerNotRemoved as exc:
            log.warning("container.orphan_kept", container=container.name, error=str(exc))
            return False
        return True

    async def _reconcile_pool(self, pool: EndpointPool) -> None:
        spec, now = pool.spec, self.clock()
        desired = 0 if pool.removed else desired_replicas(
            pool.demand(), spec.concurrency, spec.min_replicas, spec.max_replicas)
        may_start = not pool.removed and now >= pool.next_start_at and self.runtime.engine_up
        plan = plan_replicas(list(pool.replicas.values()), pool.generation, desired,
                             spec.idle_timeout_s, now, may_start, remove_all=pool.removed)
        for rid in plan.stop:
            replica = pool.replicas[rid]
            if not self._life(pool, replica).stopping:
                self._stop_soon(pool, replica, self._stop_reason(pool, replica))
        if spec.sleep is not None and not pool.removed:
            self._sleep_and_wake(pool, spec.sleep.after_s, now)
        elif spec.sleep is None:  # its sleep tier removed in place: nothing would wake them
            for replica in pool.replicas.values():
                if replica.state is S.SLEEPING and not self._life(pool, replica).stopping:
                    self._stop_soon(pool, replica, "sleep tier removed: stopped, not woken")
        for _ in range(plan.start):
            await self._add_replica(pool)
        self._retry_cleanups(pool)
        if self.runtime.engine_up:
            await self._place_pending(pool)
        if pool.removed and not pool.replicas:
            await self._forget_removed(pool)

    async def _forget_removed(self, pool: EndpointPool) -> None:
        """A removed endpoint's replicas are gone: its network and (when asked) its cache go,
        then the pool. The store forgot it already (remove_endpoint). An endpoint created
        again meanwhile revives this pool (apply): then nothing more is removed."""
        await self.runtime.remove_network(self.runtime.endpoint_network(pool.name))
        if pool.removed and pool.endpoint.purge_cache:
            await self.runtime.remove_volume(self.runtime.cache_volume(pool.name))
            await self.event("cache_purged", f"cache volume of {pool.name} removed", pool.name)
        if pool.removed and self._pools.get(pool.name) is pool:
            del self._pools[pool.name]  # last: whoever asks `holds` sees all of it done

    def _sleep_and_wake(self, pool: EndpointPool, after_s: float, now: float) -> None:
        """Wake sleepers for waiting calls first; put idle ready replicas to sleep when no
        call waits. A sleeper whose lifecycle is busy is entering sleep or waking already."""
        replicas = list(pool.replicas.values())
        busy = frozenset(r.id for r in replicas
                         if r.state is S.SLEEPING and self._life(pool, r).busy)
        waiting = pool.waiting + pool.backlog
        for rid in plan_wakes(replicas, busy, waiting, pool.spec.concurrency):
            life = self._life(pool, pool.replicas[rid])
            if not life.stopping and self._gpus_given_back(pool, pool.replicas[rid]):
                life.run(life.wake())
        if waiting:
            return
        for rid in plan_sleeps(replicas, pool.generation, after_s, now):
            life = self._life(pool, pool.replicas[rid])
            if not life.stopping:
                life.run(life.sleep())

    def _stop_reason(self, pool: EndpointPool, replica: Replica) -> str:
        if pool.removed:
            return "endpoint removed"
        if replica.generation != pool.generation:
            return f"replaced by generation {pool.generation}"
        if replica.state is S.PENDING:
            return "no longer needed"
        return f"idle for {pool.spec.idle_timeout_s:g}s"

    async def _add_replica(self, pool: EndpointPool) -> Replica:
        replica = Replica(id=f"{pool.name}-{secrets.token_hex(3)}", endpoint=pool.name,
                          generation=pool.generation, state=S.PENDING, created_at=self.clock(),
                          failures=pool.failures)
        await self.durably(self.store.save_replica, replica.record())
        pool.add(replica)
        await self.event("scale_up", f"new replica for generation {pool.generation}",
                         pool.name, replica.id)
        return replica

    async def _place_pending(self, pool: EndpointPool) -> None:
        """Give GPUs to pending replicas that have none yet and start them."""
        spec = pool.spec
        if not self.allocator.can_ever_fit(spec.gpus, spec.gpu_type, spec.gpu_memory_mib):
            await self.set_error(pool, f"needs {spec.gpus} GPU(s) matching "
                                       f"{spec.gpu_type or 'any'}"
                                       + (f" with {spec.gpu_memory_mib} MiB to share"
                                          if spec.gpu_memory_mib else "")
                                       + "; this box has fewer")
            return
        for replica in [r for r in pool.replicas.values() if r.state is S.PENDING]:
            life = self._life(pool, replica)
            if life.busy:
                continue
            gpus = await self.allocator.allocate(replica.id, spec.gpus, spec.gpu_type,
                                                 spec.gpu_memory_mib)
            if gpus is None and spec.gpu_memory is None:
                gpus = await self._borrow(pool, replica)
            if gpus is None:
                if not await self._evict_for(pool):
                    await self._roll_in_place(pool)
                continue  # stays pending until GPUs free up
            replica.gpus = [g.uuid for g in gpus]
            life.run(life.start())

    async def _roll_in_place(self, pool: EndpointPool) -> None:
        """No spare GPUs for the new generation: let an old replica go first (no surge)."""
        old = sorted((r for r in pool.replicas.values()
                      if r.generation != pool.generation and r.gpus
                      and not self._life(pool, r).stopping
                      and r.state in (S.STARTING, S.READY)), key=lambda r: r.created_at)
        if old:
            reason = f"replaced by generation {pool.generation} (no spare GPUs to start first)"
            self._stop_soon(pool, old[0], reason)

    def _retry_cleanups(self, pool: EndpointPool) -> None:
        """Finish what an engine outage interrupted: failed replicas still holding GPUs and
        drains whose container could not be removed."""
        for replica in list(pool.replicas.values()):
            life = self._life(pool, replica)
            if life.busy or not self.runtime.engine_up:
                continue
            if replica.state is S.FAILED:
                life.run(life.clean_up())
            elif replica.state is S.DRAINING and not life.stopping:
                self._stop_soon(pool, replica, replica.reason or "drain")

    # --- shutdown ------------------------------------------------------------------------------

    async def shutdown(self, stop_replicas: bool) -> None:
        """Stop watching replicas; with stop_replicas also stop them, else leave them running."""
        self._closed = True
        await self.images.close()
        if self._kick_task is not None:
            self._kick_task.cancel()
        async with self._pass_lock:
            tasks = [life.task for life in self._lives.values() if life.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if stop_replicas:
                await asyncio.gather(*(self._life(p, r).stop("berthd stopping")
                                       for p in self._pools.values()
                                       for r in list(p.replicas.values())),
                                     return_exceptions=True)
                for name in self._pools:  # nothing runs on them now
                    with contextlib.suppress(DockerUnavailable):
                        await self.runtime.remove_network(self.runtime.endpoint_network(name))
