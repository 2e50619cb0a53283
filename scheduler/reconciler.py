"""The reconciler: keeps each endpoint at its desired replicas.

It is the one place where replica state changes (`transition`), through the table in
scheduler.replica. Decisions come from scheduler.policy; this module carries them out against
the Docker runtime, the GPU allocator and the store. A pass runs every second (APScheduler) and
at once when something changes (`kick`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import structlog

from berth.daemon.config import EndpointSpec
from berth.gpu import GpuAllocator
from berth.scheduler.policy import (
    EvictionCandidate,
    backoff_delay,
    desired_replicas,
    failures_after,
    pick_evictions,
    plan_replicas,
)
from berth.scheduler.pool import EndpointPool
from berth.scheduler.probes import Prober
from berth.scheduler.replica import Replica, ReplicaState
from berth.scheduler.runtime import (
    LABEL_ENDPOINT,
    LABEL_GENERATION,
    LABEL_MANAGED,
    LABEL_REPLICA,
    ContainerInfo,
    ContainerSpec,
    ContainerStartError,
    DockerRuntime,
    DockerUnavailable,
    ImageUnavailable,
    gpu_env,
)
from berth.store import EndpointRecord, EventRecord, Store

log = structlog.get_logger("berth.reconciler")
S = ReplicaState
FIRST_PROBE_S = 0.02  # readiness is polled from this, doubling up to readiness.period_s
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


class SecretMissing(Exception):
    """An endpoint names a secret that is not stored: it cannot run until one is."""


@dataclass
class ChangeSummary:
    """What applying a set of specs did, by endpoint name."""

    created: list[str] = field(default_factory=list)
    rolled: list[str] = field(default_factory=list)  # new replicas replace the old ones
    updated: list[str] = field(default_factory=list)  # applied without replacing replicas
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


class Reconciler:
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
        self._kick_task: asyncio.Task[None] | None = None
        self._closed = False
        self._dirty = False
        self._gpu_index = {g.uuid: g.index for g in allocator.gpus}
        # Told the name of each endpoint removed (after the store forgot it): Auth drops its
        # tokens from memory.
        self.removal_listeners: list[Callable[[str], None]] = []

    # --- what callers may know of the pools ---------------------------------------------------

    def pool(self, name: str) -> EndpointPool | None:
        """The endpoint's live pool; None when there is none or it is being removed."""
        pool = self._pools.get(name)
        return None if pool is None or pool.removed else pool

    def live_pools(self) -> list[EndpointPool]:
        """Every endpoint that exists (not those draining after removal)."""
        return [p for p in self._pools.values() if not p.removed]

    @property
    def pools(self) -> Mapping[str, EndpointPool]:
        """A read-only view of every pool, removed ones included (for inspection and tests)."""
        return MappingProxyType(self._pools)

    # --- the one place replica state changes ------------------------------------------------

    async def transition(self, pool: EndpointPool, replica: Replica, new: ReplicaState,
                         reason: str | None = None, kind: str | None = None,
                         wake: bool = True) -> None:
        """Move a replica to `new` (IllegalTransition if the table forbids it): stored first
        (retried while the disk is full), then changed in memory, then told.

        Moves into ready, failed or stopped wake the pool's waiters; a caller with cleanup
        still to do passes wake=False and wakes them itself once the world is consistent.
        """
        replica.check_move(new)
        now, moved = self.clock(), dataclasses.replace(replica, state=new)
        if new is S.STARTING:
            moved.started_at = now
        elif new is S.READY:
            moved.ready_at = now
        elif new in (S.STOPPED, S.FAILED):
            moved.stopped_at = now
        if reason is not None:
            moved.reason = reason
        await self.durably(self.store.save_replica, moved.record())
        replica.state, replica.reason = new, moved.reason
        replica.started_at, replica.ready_at = moved.started_at, moved.ready_at
        replica.stopped_at = moved.stopped_at
        await self.event(kind or new.value, reason or new.value, pool.name, replica.id)
        if new is S.READY:
            pool.dispatch()  # queued calls take the new slots at once
        if wake and new in (S.READY, S.FAILED, S.STOPPED):
            await pool.notify()

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
        try:
            await self.store.add_event(EventRecord(ts=self.clock(), kind=kind, message=message,
                                                   endpoint=endpoint, replica=replica))
        except (sqlite3.Error, OSError) as exc:
            log.warning("event.not_stored", event_kind=kind, error=str(exc))
        log.info(event_name(kind, replica), message=message, endpoint=endpoint,
                 replica=replica)

    # --- endpoints -----------------------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild pools from the store (endpoints created over the API live only there)."""
        for rec in await self.store.endpoints():
            spec = EndpointSpec.model_validate(rec.spec)
            self._pools[rec.name] = EndpointPool(spec=spec, source=rec.source,
                                                generation=rec.generation, error=rec.error)

    async def apply_specs(self, specs: Mapping[str, EndpointSpec], source: str) -> ChangeSummary:
        """Make the endpoints of `source` exactly `specs`; replicas follow in the next passes."""
        summary = ChangeSummary()
        for spec in specs.values():
            await self._apply_one(spec, source, summary)
        for name, pool in list(self._pools.items()):
            if pool.source == source and name not in specs and not pool.removed:
                await self.remove_endpoint(name)
                summary.removed.append(name)
        self.kick()
        return summary

    async def put_endpoint(self, spec: EndpointSpec, source: str) -> ChangeSummary:
        """Create or change one endpoint (the API's way in)."""
        summary = ChangeSummary()
        await self._apply_one(spec, source, summary)
        self.kick()
        return summary

    def secret_changed(self, name: str) -> None:
        """A secret was stored: endpoints waiting for it try again now, not after backoff."""
        for pool in self._pools.values():
            if name in pool.spec.secrets and pool.error:
                pool.next_start_at = 0.0
        self.kick()

    async def remove_endpoint(self, name: str) -> None:
        """Delete the endpoint (and its tokens) from the store, then drain and stop its
        replicas; the pool is forgotten once they are gone. A restart in between finds no
        endpoint and removes the replicas as orphans."""
        pool = self._pools[name]
        await self.store.delete_endpoint(name)  # persist first: the tokens go with it
        pool.removed = True
        for listener in self.removal_listeners:
            listener(name)
        pool.fail_waiters(f"endpoint {name} was removed")
        await self.event("endpoint_removed", f"endpoint {name} removed", name)
        self.kick()

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
        await self.store.save_endpoint(EndpointRecord(
            name=name, spec=spec.model_dump(mode="json"), source=source,
            generation=generation, error=None))
        if pool is None:
            pool = self._pools[name] = EndpointPool(spec=spec, source=source)
        pool.spec, pool.source, pool.error, pool.generation = spec, source, None, generation
        pool.removed, pool.failures, pool.next_start_at = False, 0, 0.0
        getattr(summary, bucket).append(name)
        await self.event(kind, message, name)

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

    async def _set_error(self, pool: EndpointPool, error: str | None) -> None:
        if error is not None:
            pool.fail_waiters(error)
        if pool.error != error:
            pool.error = error
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
                    and replica.state in (S.STARTING, S.READY, S.DRAINING)):
                pool.replicas[replica.id] = replica
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
                await self.runtime.remove(container.id, timeout_s=0)
                await self.event("orphan_removed",
                                 f"removed container {container.name} unknown to the store",
                                 container.labels.get(LABEL_ENDPOINT), rid)
        await self.allocator.load()
        for rid in set(self.allocator.owners().values()) - adopted:
            await self.allocator.free(rid)

    def _resume(self, pool: EndpointPool, replica: Replica) -> None:
        if replica.state is S.STARTING:
            self._spawn(pool, replica, self._await_ready(pool, replica))
        elif replica.state is S.READY:
            self._spawn(pool, replica, self._watch_liveness(pool, replica))
        else:
            pool.stopping.add(replica.id)
            self._spawn(pool, replica, self._stop(pool, replica, "draining when berthd stopped"))

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
        """A reconcile pass whose errors are logged, never raised (for timers and kicks)."""
        try:
            await self.reconcile(check_containers)
        except Exception:
            log.exception("reconcile.pass_failed")

    async def reconcile(self, check_containers: bool = True) -> None:
        """One pass over every endpoint. Passes never overlap.

        check_containers: also list the engine's containers to catch exits (one engine call;
        the periodic pass does it, kicks that only react to demand skip it).
        """
        async with self._pass_lock:
            containers = None
            try:
                if check_containers:
                    containers = await self.runtime.list_managed()
            except DockerUnavailable:
                pass  # the runtime says so once per outage
            except Exception as exc:  # engine hiccup: skip the container check, keep going
                log.warning("reconcile.list_failed", error=str(exc))
            if containers is not None:
                await self._check_containers(containers)
            if not self.runtime.engine_up:  # no replica can start: waiting calls hear it now
                for pool in self._pools.values():
                    pool.fail_waiters(f"the Docker engine is unreachable "
                                      f"({self.runtime.down_reason})")
            for pool in list(self._pools.values()):
                await self._reconcile_pool(pool)

    async def _check_containers(self, containers: list[ContainerInfo]) -> None:
        """Fail replicas whose container stopped; remove containers no replica owns."""
        by_replica = {c.replica: c for c in containers}
        known: set[str] = set()
        for pool in self._pools.values():
            for replica in list(pool.replicas.values()):
                known.add(replica.id)
                if replica.state not in (S.STARTING, S.READY) or replica.id in pool.stopping:
                    continue  # a stop under way removes the container itself
                container = by_replica.get(replica.id)
                if container is None or not container.running:
                    status = container.status if container else "gone"
                    await self.fail(pool, replica, f"container exited ({status})")
        for container in containers:
            if container.replica not in known:
                await self.runtime.remove(container.id, timeout_s=0)

    async def _reconcile_pool(self, pool: EndpointPool) -> None:
        spec, now = pool.spec, self.clock()
        desired = 0 if pool.removed else desired_replicas(
            pool.demand(), spec.concurrency, spec.min_replicas, spec.max_replicas)
        may_start = not pool.removed and now >= pool.next_start_at and self.runtime.engine_up
        plan = plan_replicas(list(pool.replicas.values()), pool.generation, desired,
                             spec.idle_timeout_s, now, may_start, remove_all=pool.removed)
        for rid in plan.stop:
            if rid in pool.stopping:
                continue
            pool.stopping.add(rid)
            replica = pool.replicas[rid]
            self._spawn(pool, replica, self._stop(pool, replica, self._stop_reason(pool, replica)))
        for _ in range(plan.start):
            await self._add_replica(pool)
        self._retry_cleanups(pool)
        if self.runtime.engine_up:
            await self._place_pending(pool)
        if pool.removed and not pool.replicas:
            del self._pools[pool.name]
            await self.store.delete_endpoint(pool.name)
            await self.runtime.remove_network(self.runtime.endpoint_network(pool.name))

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
        pool.replicas[replica.id] = replica
        await self.event("scale_up", f"new replica for generation {pool.generation}",
                         pool.name, replica.id)
        return replica

    async def _place_pending(self, pool: EndpointPool) -> None:
        """Give GPUs to pending replicas that have none yet and start them."""
        spec = pool.spec
        if not self.allocator.can_ever_fit(spec.gpus, spec.gpu_type):
            await self._set_error(pool, f"needs {spec.gpus} GPU(s) matching "
                                        f"{spec.gpu_type or 'any'}; this box has fewer")
            return
        for replica in [r for r in pool.replicas.values() if r.state is S.PENDING]:
            if replica.id in pool.tasks:
                continue
            gpus = await self.allocator.allocate(replica.id, spec.gpus, spec.gpu_type)
            if gpus is None:
                if not await self._evict_for(pool):
                    await self._roll_in_place(pool)
                continue  # stays pending until GPUs free up
            replica.gpus = [g.uuid for g in gpus]
            self._spawn(pool, replica, self._start(pool, replica))

    async def _roll_in_place(self, pool: EndpointPool) -> None:
        """No spare GPUs for the new generation: let an old replica go first (no surge)."""
        old = sorted((r for r in pool.replicas.values()
                      if r.generation != pool.generation and r.gpus and r.id not in pool.stopping
                      and r.state in (S.STARTING, S.READY)), key=lambda r: r.created_at)
        if old:
            victim = old[0]
            pool.stopping.add(victim.id)
            reason = f"replaced by generation {pool.generation} (no spare GPUs to start first)"
            self._spawn(pool, victim, self._stop(pool, victim, reason))

    async def _evict_for(self, pool: EndpointPool) -> bool:
        """Stop idle replicas of other endpoints so that a pending one of `pool` gets GPUs.

        True when GPUs are on their way (stops under way or just started)."""
        coming = sum(1 for p in self._pools.values() for r in p.replicas.values()
                     if (r.id in p.stopping or r.state is S.FAILED) and r.gpus)
        # (stops under way and failed replicas being cleaned up free GPUs already)
        if coming:
            return True
        spec = pool.spec
        victims = pick_evictions(self._eviction_candidates(pool), spec.gpus,
                                 self.allocator.free_count(spec.gpu_type), spec.gpu_type,
                                 spec.priority)
        for rid in victims:
            victim_pool = next(p for p in self._pools.values() if rid in p.replicas)
            victim = victim_pool.replicas[rid]
            victim_pool.stopping.add(rid)
            reason = (f"evicted: GPUs needed by {pool.name} (priority {spec.priority}, "
                      f"this endpoint {victim_pool.spec.priority})")
            await self.event("eviction", reason, victim_pool.name, rid)
            self._spawn(victim_pool, victim, self._stop(victim_pool, victim, reason))
        return bool(victims)

    def _eviction_candidates(self, pool: EndpointPool) -> list[EvictionCandidate]:
        """Idle GPU replicas of other endpoints, never taking one below its min_replicas."""
        names = {g.uuid: g.name for g in self.allocator.gpus}
        found = []
        for other in self._pools.values():
            if other is pool:
                continue
            live = [r for r in other.replicas.values()
                    if r.state in (S.STARTING, S.READY) and r.id not in other.stopping]
            idle = sorted((r for r in live if r.state is S.READY and r.in_flight == 0
                           and r.gpus), key=lambda r: r.idle_since)
            spare = max(0, len(live) - other.spec.min_replicas)
            found += [EvictionCandidate(r.id, other.name, other.spec.priority, r.idle_since,
                                        tuple(names.get(u, "") for u in r.gpus))
                      for r in idle[:spare]]
        return found

    def _spawn(self, pool: EndpointPool, replica: Replica,
               work: Coroutine[Any, Any, None]) -> None:
        """Run a replica's lifecycle step as its one task, replacing any task it had."""
        old = pool.tasks.get(replica.id)
        if old is not None and old is not asyncio.current_task():
            old.cancel()
        task = asyncio.get_running_loop().create_task(work, name=f"replica:{replica.id}")
        pool.tasks[replica.id] = task
        task.add_done_callback(lambda t: _forget(pool, replica.id, t))

    # --- replica lifecycle -------------------------------------------------------------------

    async def _start(self, pool: EndpointPool, replica: Replica) -> None:
        spec = pool.spec
        try:
            await self.runtime.ensure_image(spec.image)
            info = await self.runtime.run(await self._container_spec(pool, replica))
        except (ImageUnavailable, ContainerStartError, SecretMissing) as exc:
            await self._set_error(pool, str(exc))
            await self.fail(pool, replica, str(exc), kind="start_failed")
            return
        except DockerUnavailable as exc:  # not the endpoint's fault: no backoff for it
            await self.fail(pool, replica, str(exc), kind="start_failed", counts=False)
            return
        except Exception as exc:  # a bug must not leave the replica pending with its GPUs
            log.exception("replica.start_crashed", replica=replica.id)
            await self.fail(pool, replica, f"start failed: {exc!r}", kind="start_failed")
            return
        replica.container_id = info.id
        replica.address = f"{info.ip}:{spec.port}"
        await self.transition(pool, replica, S.STARTING,
                              f"container {info.id[:12]} started at {replica.address}", "start")
        await self._await_ready(pool, replica)

    async def _container_spec(self, pool: EndpointPool, replica: Replica) -> ContainerSpec:
        spec = pool.spec
        secret_env = await self.store.secret_values(spec.secrets)
        missing = [n for n in spec.secrets if n not in secret_env]
        if missing:
            raise SecretMissing(f"secret {', '.join(missing)} is not stored")
        indexes = [self._gpu_index[u] for u in replica.gpus]
        env = {**spec.env, **secret_env,
               "BERTH_ENDPOINT": pool.name, "BERTH_REPLICA": replica.id,
               **gpu_env(replica.gpus, indexes, self.gpu_mode)}
        labels = {**spec.labels, LABEL_MANAGED: "true", LABEL_ENDPOINT: pool.name,
                  LABEL_REPLICA: replica.id, LABEL_GENERATION: str(replica.generation)}
        return ContainerSpec(
            name=f"berth-{replica.id}", image=spec.image, labels=labels, env=env,
            port=spec.port, command=spec.command, args=spec.args, volumes=spec.volumes,
            shm_size=spec.shm_size, cpus=spec.cpus, memory=spec.memory,
            gpu_uuids=list(replica.gpus), gpu_mode=self.gpu_mode,
            network=self.runtime.endpoint_network(pool.name), pids_limit=spec.pids_limit,
            cap_add=list(spec.cap_add), user=spec.user)

    async def _await_ready(self, pool: EndpointPool, replica: Replica) -> None:
        """Poll readiness until it passes (ready) or startup_timeout_s runs out (failed)."""
        probe = pool.spec.readiness
        deadline = (replica.started_at or self.clock()) + pool.spec.startup_timeout_s
        delay = FIRST_PROBE_S
        assert replica.address is not None
        while self.clock() < deadline:
            if await self.prober.check(replica.address, probe.path, probe.timeout_s):
                await self._set_error(pool, None)
                await self.transition(pool, replica, S.READY, "readiness passed")
                await self._watch_liveness(pool, replica)
                return
            await asyncio.sleep(min(delay, max(0.0, deadline - self.clock())))
            delay = min(delay * 2, probe.period_s)
        await self.fail(pool, replica,
                        f"not ready within startup_timeout_s={pool.spec.startup_timeout_s:g}")

    async def _watch_liveness(self, pool: EndpointPool, replica: Replica) -> None:
        probe, path = pool.spec.liveness, pool.spec.liveness_path
        failed = 0
        assert replica.address is not None
        while replica.state is S.READY:
            await asyncio.sleep(probe.period_s)
            ok = await self.prober.check(replica.address, path, probe.timeout_s)
            failed = 0 if ok else failed + 1
            if failed >= probe.failure_threshold:
                await self.fail(pool, replica, f"liveness failed {failed} times in a row")
                return

    async def fail(self, pool: EndpointPool, replica: Replica, reason: str,
                   kind: str = "crash", counts: bool = True) -> None:
        """Mark failed, then clean up (container, GPUs). `counts`: the failure was the
        replica's own and delays the next one (backoff); an engine outage was not."""
        if replica.state in (S.FAILED, S.STOPPED):
            return
        if counts:
            pool.failures = failures_after(pool.failures, replica.ready_at, self.clock())
            pool.next_start_at = self.clock() + backoff_delay(pool.failures)
        replica.failures = pool.failures
        delay = max(0.0, pool.next_start_at - self.clock())
        # Failed at once (no new calls), but waiters wake only once its GPUs are free.
        await self.transition(pool, replica, S.FAILED,
                              f"{reason}; next replica in {delay:g}s", kind, wake=False)
        self._cancel_task(pool, replica)
        await self._clean_up_failed(pool, replica)

    async def _clean_up_failed(self, pool: EndpointPool, replica: Replica) -> None:
        """Remove a failed replica's container (keeping its last log lines), then free its
        GPUs and forget it. With the engine unreachable the replica stays, failed and holding
        its GPUs, until a later pass finds the container gone (_retry_cleanups)."""
        container = replica.container_id or f"berth-{replica.id}"  # a start cut short
        try:
            if replica.container_id:
                tail = await self.runtime.logs_tail(replica.container_id, 10)
                if tail:
                    await self.event("logs", f"last log lines: {tail}", pool.name, replica.id)
            await self.runtime.remove(container, timeout_s=0)
        except DockerUnavailable:
            return  # GPUs stay held: the container may still be running
        await self.durably(self.allocator.free, replica.id)  # only after the container is gone
        pool.replicas.pop(replica.id, None)
        await pool.notify()
        self.kick()

    def _retry_cleanups(self, pool: EndpointPool) -> None:
        """Finish what an engine outage interrupted: failed replicas still holding GPUs and
        drains whose container could not be removed."""
        for replica in list(pool.replicas.values()):
            if replica.id in pool.tasks or not self.runtime.engine_up:
                continue
            if replica.state is S.FAILED:
                self._spawn(pool, replica, self._clean_up_failed(pool, replica))
            elif replica.state is S.DRAINING and replica.id not in pool.stopping:
                pool.stopping.add(replica.id)
                self._spawn(pool, replica, self._stop(pool, replica, replica.reason or "drain"))

    async def _stop(self, pool: EndpointPool, replica: Replica, reason: str) -> None:
        """Drain (wait for calls in flight), remove the container, free GPUs, mark stopped."""
        try:
            await self._drain_and_remove(pool, replica, reason)
        finally:
            pool.stopping.discard(replica.id)

    async def _drain_and_remove(self, pool: EndpointPool, replica: Replica, reason: str) -> None:
        if replica.state in (S.STARTING, S.READY):
            await self.transition(pool, replica, S.DRAINING, reason, "drain")
        if replica.state is S.DRAINING:
            async with pool.changed:
                await pool.changed.wait_for(lambda: replica.in_flight == 0)
        if replica.state in (S.FAILED, S.STOPPED):
            return
        if replica.container_id:
            try:
                await self.runtime.remove(replica.container_id)
            except DockerUnavailable:
                return  # still draining, GPUs held; _retry_cleanups stops it later
        await self.durably(self.allocator.free, replica.id)
        await self.transition(pool, replica, S.STOPPED, reason, "scale_down")
        pool.replicas.pop(replica.id, None)
        self.kick()

    def _cancel_task(self, pool: EndpointPool, replica: Replica) -> None:
        task = pool.tasks.pop(replica.id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    # --- shutdown ------------------------------------------------------------------------------

    async def shutdown(self, stop_replicas: bool) -> None:
        """Stop watching replicas; with stop_replicas also stop them, else leave them running."""
        self._closed = True
        if self._kick_task is not None:
            self._kick_task.cancel()
        async with self._pass_lock:
            tasks = [t for p in self._pools.values() for t in p.tasks.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if stop_replicas:
                await asyncio.gather(*(self._stop(p, r, "berthd stopping")
                                       for p in self._pools.values()
                                       for r in list(p.replicas.values())),
                                     return_exceptions=True)
                for name in self._pools:  # nothing runs on them now
                    with contextlib.suppress(DockerUnavailable):
                        await self.runtime.remove_network(self.runtime.endpoint_network(name))


def _forget(pool: EndpointPool, replica_id: str, task: asyncio.Task[None]) -> None:
    if pool.tasks.get(replica_id) is task:
        del pool.tasks[replica_id]
    if not task.cancelled() and task.exception() is not None:
        log.error("replica.task_crashed", replica=replica_id, endpoint=pool.name,
                  error=repr(task.exception()))
