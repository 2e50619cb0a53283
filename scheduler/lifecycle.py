"""One replica's life, owned by one ReplicaLifecycle with one task: start (container spec,
image, container), await readiness, watch liveness, fail and clean up, drain and stop.

It owns the replica's state: `transition` is the one place a replica moves, through the
table in scheduler.replica, stored before memory changes. The reconciler decides *when*
(passes, adoption, eviction) and calls `start`, `resume`, `stop`, `fail` and `clean_up`; it
reaches the world (store, engine, GPUs, events) through the Context it hands in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import structlog

from berth.gpu import Gpu, GpuAllocator
from berth.scheduler.endpoint import StartPhases
from berth.scheduler.images import ImagePuller
from berth.scheduler.pool import EndpointPool
from berth.scheduler.probes import Prober
from berth.scheduler.replica import Replica, ReplicaState
from berth.scheduler.runtime import (
    LABEL_ENDPOINT,
    LABEL_GENERATION,
    LABEL_MANAGED,
    LABEL_REPLICA,
    ContainerInfo,
    ContainerNotRemoved,
    ContainerSpec,
    ContainerStartError,
    DockerRuntime,
    DockerUnavailable,
    ImageUnavailable,
    gpu_env,
)
from berth.store import Store

BERTH_VAR = re.compile(r"\$\{(BERTH_[A-Z_]+)\}")
log = structlog.get_logger("berth.lifecycle")
S = ReplicaState
FIRST_PROBE_S = 0.02  # readiness is polled from this, doubling up to readiness.period_s


class SecretMissing(Exception):
    """An endpoint names a secret that is not stored: it cannot run until one is."""


class Context(Protocol):
    """What a lifecycle needs from the rest of berth (the reconciler provides it)."""

    store: Store
    runtime: DockerRuntime
    allocator: GpuAllocator
    prober: Prober
    images: ImagePuller
    gpu_mode: str
    clock: Callable[[], float]

    async def durably(self, write: Callable[..., Awaitable[None]], *args: Any) -> None: ...

    async def event(self, kind: str, message: str, endpoint: str | None = None,
                    replica: str | None = None) -> None: ...

    async def set_error(self, pool: EndpointPool, error: str | None) -> None: ...

    def start_observed(self, pool: EndpointPool, phases: StartPhases) -> None: ...

    def wake_observed(self, pool: EndpointPool, seconds: float) -> None: ...

    def kick(self) -> None: ...

    def forget(self, replica: Replica) -> None: ...


class ReplicaLifecycle:
    """The owner of one replica: every step of its life runs as this object's one task
    (a new step replaces the old), and only `transition` changes its state."""

    def __init__(self, ctx: Context, pool: EndpointPool, replica: Replica) -> None:
        self.ctx = ctx
        self.pool = pool
        self.replica = replica
        self.task: asyncio.Task[None] | None = None
        self.stopping = False  # a stop is under way: the pass does not start another
        # The engine's create of the container: it runs in the runtime's thread, which a
        # cancelled start cannot stop, so a stop that follows waits for it (_created)
        self._creating: asyncio.Future[ContainerInfo] | None = None

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    # --- the one task -----------------------------------------------------------------------

    def run(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a step of the life as its one task, replacing any task it had."""
        self.cancel()
        self.task = asyncio.get_running_loop().create_task(work,
                                                           name=f"replica:{self.replica.id}")
        self.task.add_done_callback(self._done)

    def cancel(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("replica.task_crashed", replica=self.replica.id, endpoint=self.pool.name,
                      error=repr(task.exception()))

    # --- the one place replica state changes ------------------------------------------------

    async def transition(self, new: ReplicaState, reason: str | None = None,
                         kind: str | None = None, wake: bool = True) -> None:
        """Move the replica to `new` (IllegalTransition if the table forbids it): stored first
        (retried while the disk is full), then changed in memory, then told.

        Moves into ready, failed or stopped wake the pool's waiters; a caller with cleanup
        still to do passes wake=False and wakes them itself once the world is consistent.
        """
        replica, pool = self.replica, self.pool
        replica.check_move(new)
        now, moved = self.ctx.clock(), dataclasses.replace(replica, state=new)
        if new is S.STARTING:
            moved.started_at = now
        elif new is S.READY:
            moved.ready_at = now
        elif new in (S.STOPPED, S.FAILED):
            moved.stopped_at = now
        if reason is not None:
            moved.reason = reason
        await self.ctx.durably(self.ctx.store.save_replica, moved.record())
        replica.state, replica.reason = new, moved.reason
        replica.started_at, replica.ready_at = moved.started_at, moved.ready_at
        replica.stopped_at = moved.stopped_at
        await self.ctx.event(kind or new.value, reason or new.value, pool.name, replica.id)
        if new is S.READY:
            pool.dispatch()  # queued calls take the new slots at once
        if wake and new in (S.READY, S.FAILED, S.STOPPED):
            await pool.notify()

    # --- starting ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Image, container, readiness, then liveness until the replica leaves ready."""
        pool, replica, runtime = self.pool, self.replica, self.ctx.runtime
        try:
            began = time.monotonic()
            await self.ctx.images.settled(pool.spec.image)  # a pre-pull under way: wait for it
            await runtime.ensure_image(pool.spec.image)
            pulled = time.monotonic() - began
            creating = asyncio.ensure_future(runtime.run(await self.container_spec()))
            self._creating = creating
            info = await asyncio.shield(creating)
            self._creating = None
        except (ImageUnavailable, ContainerStartError, SecretMissing) as exc:
            await self.ctx.set_error(pool, str(exc))
            await self.fail(str(exc), kind="start_failed")
            return
        except DockerUnavailable as exc:  # not the endpoint's fault: no backoff for it
            await self.fail(str(exc), kind="start_failed", counts=False)
            return
        except Exception as exc:  # a bug must not leave the replica pending with its GPUs
            log.exception("replica.start_crashed", replica=replica.id)
            await self.fail(f"start failed: {exc!r}", kind="start_failed")
            return
        replica.container_id = info.id
        replica.address = f"{info.ip}:{pool.spec.port}"
        running = time.monotonic()
        await self.transition(S.STARTING,
                              f"container {info.id[:12]} started at {replica.address}", "start")
        await self.await_ready(lambda: StartPhases(pulled, info.create_s, info.start_s,
                                                   time.monotonic() - running))

    async def resume(self) -> None:
        """Watch an adopted replica again from the state the store had."""
        if self.replica.state is S.STARTING:
            await self.await_ready()
        elif self.replica.state is S.READY:
            await self.watch_liveness()
        elif self.replica.state is S.SLEEPING:
            return  # asleep it stays, unprobed, until a call wakes it
        else:
            await self.stop("draining when berthd stopped")

    async def container_spec(self) -> ContainerSpec:
        pool, replica, ctx = self.pool, self.replica, self.ctx
        spec = pool.spec
        secret_env = await ctx.store.secret_values(spec.secrets)
        missing = [n for n in spec.secrets if n not in secret_env]
        if missing:
            raise SecretMissing(f"secret {', '.join(missing)} is not stored")
        index = {g.uuid: g.index for g in ctx.allocator.gpus}
        berth_env = {"BERTH_ENDPOINT": pool.name, "BERTH_REPLICA": replica.id,
                     **share_env(spec.gpu_memory_mib, ctx.allocator.held_by(replica.id))}
        env = {**spec.env, **secret_env, **berth_env,
               **gpu_env(replica.gpus, [index[u] for u in replica.gpus], ctx.gpu_mode)}
        args = [substitute(a, berth_env) for a in spec.args] if spec.args else spec.args
        labels = {**spec.labels, LABEL_MANAGED: "true", LABEL_ENDPOINT: pool.name,
                  LABEL_REPLICA: replica.id, LABEL_GENERATION: str(replica.generation)}
        return ContainerSpec(
            name=f"berth-{replica.id}", image=spec.image, labels=labels, env=env,
            port=spec.port, command=spec.command, args=args, volumes=spec.volumes,
            shm_size=spec.shm_size, cpus=spec.cpus, memory=spec.memory,
            gpu_uuids=list(replica.gpus), gpu_mode=ctx.gpu_mode,
            network=ctx.runtime.endpoint_network(pool.name), pids_limit=spec.pids_limit,
            cap_add=list(spec.cap_add), user=spec.user,
            cache=(ctx.runtime.cache_volume(pool.name), spec.cache_dir) if spec.cache_dir
            else None)

    async def await_ready(self, phases: Callable[[], StartPhases] | None = None) -> None:
        """Poll readiness until it passes (ready) or startup_timeout_s runs out (failed).
        `phases` (for a start of this lifecycle, not an adopted one) says where it went."""
        pool, replica, clock = self.pool, self.replica, self.ctx.clock
        probe = pool.spec.readiness
        deadline = (replica.started_at or clock()) + pool.spec.startup_timeout_s
        delay = FIRST_PROBE_S
        assert replica.address is not None
        while clock() < deadline:
            if await self.ctx.prober.check(replica.address, probe.path, probe.timeout_s):
                await self.ctx.set_error(pool, None)
                went = phases() if phases is not None else None
                reason = "readiness passed"
                if went is not None:
                    pool.endpoint.record_start(went)
                    self.ctx.start_observed(pool, went)
                    reason += f" ({went.text()})"
                await self.transition(S.READY, reason)
                await self.watch_liveness()
                return
            await asyncio.sleep(min(delay, max(0.0, deadline - clock())))
            delay = min(delay * 2, probe.period_s)
        await self.fail(f"not ready within startup_timeout_s={pool.spec.startup_timeout_s:g}")

    async def watch_liveness(self) -> None:
        spec, replica = self.pool.spec, self.replica
        probe, failed = spec.liveness, 0
        assert replica.address is not None
        while replica.state is S.READY:
            await asyncio.sleep(probe.period_s)
            ok = await self.ctx.prober.check(replica.address, spec.liveness_path,
                                             probe.timeout_s)
            failed = 0 if ok else failed + 1
            if failed >= probe.failure_threshold:
                await self.fail(await self._liveness_reason(failed))
                return

    async def _liveness_reason(self, failed: int) -> str:
        """Why liveness failed: a model that exited says so (its probe only saw a refused
        connection), whichever of the probe and the reconciler's pass noticed first."""
        reason = f"liveness failed {failed} times in a row"
        if self.replica.container_id is None:
            return reason
        try:  # (not long: a dead replica must not stay ready behind a busy or hung engine)
            ended = await asyncio.wait_for(
                self.ctx.runtime.exit_status(self.replica.container_id),
                self.pool.spec.liveness.timeout_s)
        except (DockerUnavailable, TimeoutError):
            return reason
        return reason if ended is None else f"container exited ({ended}); {reason}"

    # --- sleeping and waking (the endpoint's sleep tier) ---------------------------------------

    async def sleep(self, reason: str | None = None) -> None:
        """Idle long enough (or its GPU wanted by a waking co-tenant: `reason`): no new calls
        from here on (sleeping), then the model's sleep call once a call that slipped in before
        has ended. A failed call fails the replica."""
        pool, replica = self.pool, self.replica
        tier = pool.spec.sleep
        assert tier is not None
        await self.transition(S.SLEEPING, reason or f"idle for {tier.after_s:g} s: put to sleep",
                              "sleep")
        async with pool.changed:
            await pool.changed.wait_for(lambda: replica.in_flight == 0)
        error = await self._model_call(tier.enter, tier.wake_timeout_s)
        if error is not None and replica.state is S.SLEEPING:
            await self.fail(f"sleep call {tier.enter} failed: {error}")

    async def wake(self) -> None:
        """A call wants this replica: the model's wake call, then readiness, then ready (the
        waiting calls get it). A failed or slow wake fails the replica; its calls wait on for
        the replacement."""
        pool, replica, clock = self.pool, self.replica, self.ctx.clock
        tier = pool.spec.sleep
        assert tier is not None and replica.address is not None
        began, deadline = time.monotonic(), clock() + tier.wake_timeout_s
        error = await self._model_call(tier.wake, tier.wake_timeout_s)
        while error is None and not await self.ctx.prober.check(
                replica.address, pool.spec.readiness.path, pool.spec.readiness.timeout_s):
            if clock() >= deadline:
                error = f"not ready within wake_timeout_s={tier.wake_timeout_s:g}"
            await asyncio.sleep(FIRST_PROBE_S)
        if replica.state is not S.SLEEPING:
            return  # stopped or failed meanwhile
        if error is not None:
            await self.fail(f"wake call {tier.wake} failed: {error}")
            return
        woke = time.monotonic() - began
        self.ctx.wake_observed(pool, woke)
        await self.transition(S.READY, f"woken in {woke:.2f} s", "wake")
        await self.watch_liveness()

    async def _model_call(self, call: str, timeout_s: float) -> str | None:
        """`METHOD /path` on the replica; None if it answered 2xx, else what went wrong."""
        method, path = call.split(" ", 1)
        assert self.replica.address is not None
        try:
            status = await self.ctx.prober.call(method, self.replica.address, path, timeout_s)
        except (OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if 200 <= status < 300 else f"answered {status}"

    # --- ending -----------------------------------------------------------------------------

    async def fail(self, reason: str, kind: str = "crash", counts: bool = True) -> None:
        """Mark failed, then clean up (container, GPUs). `counts`: the failure was the
        replica's own and delays the next one (backoff); an engine outage was not."""
        pool, replica, now = self.pool, self.replica, self.ctx.clock()
        if replica.state in (S.FAILED, S.STOPPED):
            return
        if counts:
            pool.endpoint.count_failure(replica.ready_at, now)
        replica.failures = pool.failures
        delay = max(0.0, pool.next_start_at - now)
        # Failed at once (no new calls), but waiters wake only once its GPUs are free.
        await self.transition(S.FAILED, f"{reason}; next replica in {delay:g}s", kind,
                              wake=False)
        self.cancel()
        await self.clean_up()

    async def clean_up(self) -> None:
        """Remove a failed replica's container (keeping its last log lines), then free its
        GPUs and forget it. With the engine unreachable the replica stays, failed and holding
        its GPUs, until a later pass finds the container gone and calls this again."""
        pool, replica, ctx = self.pool, self.replica, self.ctx
        await self._created()
        container = replica.container_id or f"berth-{replica.id}"  # a start cut short
        try:
            if replica.container_id:
                tail = await ctx.runtime.logs_tail(replica.container_id, 10)
                if tail:
                    await ctx.event("logs", f"last log lines: {tail}", pool.name, replica.id)
            await ctx.runtime.remove(container, timeout_s=0)
        except (DockerUnavailable, ContainerNotRemoved) as exc:
            log.warning("replica.cleanup_deferred", replica=replica.id, error=str(exc))
            return  # GPUs stay held: the container may still be running
        await ctx.durably(ctx.allocator.free, replica.id)  # only after the container is gone
        pool.forget(replica)
        ctx.forget(replica)
        await pool.notify()
        ctx.kick()

    async def stop(self, reason: str) -> None:
        """Drain (wait for calls in flight), remove the container, free GPUs, mark stopped."""
        self.stopping = True
        try:
            await self._drain_and_remove(reason)
        finally:
            self.stopping = False

    async def _created(self) -> None:
        """A start cut short while the engine created its container: that create goes on in
        the runtime's thread; wait for it, so that its container is removed before the GPUs
        it was given go to another replica."""
        creating = self._creating
        if creating is None:
            return
        try:
            info = await asyncio.shield(creating)  # (a stop cancelled here leaves it to the next)
        except Exception:  # (the start's own error; runtime.run leaves no container behind)
            self._creating = None
            return
        self._creating = None
        if self.replica.container_id is None:
            self.replica.container_id = info.id

    async def _drain_and_remove(self, reason: str) -> None:
        pool, replica, ctx = self.pool, self.replica, self.ctx
        await self._created()
        if replica.state in (S.STARTING, S.READY, S.SLEEPING):
            await self.transition(S.DRAINING, reason, "drain")
        if replica.state is S.DRAINING:
            async with pool.changed:
                await pool.changed.wait_for(lambda: replica.in_flight == 0)
        if replica.state in (S.FAILED, S.STOPPED):
            return
        if replica.container_id:
            try:
                await ctx.runtime.remove(replica.container_id)
            except (DockerUnavailable, ContainerNotRemoved) as exc:
                log.warning("replica.stop_deferred", replica=replica.id, error=str(exc))
                return  # still draining, GPUs held; a later pass stops it again
        await ctx.durably(ctx.allocator.free, replica.id)
        await self.transition(S.STOPPED, reason, "scale_down")
        pool.forget(replica)
        ctx.forget(replica)
        ctx.kick()


def share_env(memory_mib: int | None, gpus: list[Gpu]) -> dict[str, str]:
    """What a replica sharing a GPU by memory is told of its share (none for whole GPUs)."""
    if not memory_mib or len(gpus) != 1:
        return {}
    fraction = math.floor(memory_mib / gpus[0].memory_mib * 1000) / 1000  # never above it
    return {"BERTH_GPU_MEMORY_MIB": str(memory_mib), "BERTH_GPU_MEMORY_FRACTION": f"{fraction:.3f}"}


def substitute(arg: str, values: dict[str, str]) -> str:
    """`${BERTH_...}` in an argument replaced by berth's value (so model servers that take the
    share as a flag, like vLLM's --gpu-memory-utilization, get it); other text is left."""
    return BERTH_VAR.sub(lambda m: values.get(m.group(1), m.group(0)), arg)
