"""The reconciler's moves of GPUs between replicas: taking a GPU out of service (cordon,
unhealthy), lending a sleeping replica's GPUs and getting them back for a wake, and evicting
idle replicas of other endpoints. A mixin of Reconciler: it changes replicas only through the
reconciler's lifecycles (`_life`, `_stop_soon`), so state still changes in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from berth.gpu import Gpu, GpuAllocator, GpuMark, GpuMarkKind
from berth.scheduler.policy import (
    CoTenant,
    EvictionCandidate,
    LendableGpu,
    lending_partners,
    pick_evictions,
    pick_loan,
    plan_reclaim,
)
from berth.scheduler.pool import EndpointPool
from berth.scheduler.replica import Replica, ReplicaState

if TYPE_CHECKING:
    from berth.scheduler.lifecycle import ReplicaLifecycle

S = ReplicaState


class GpuMoves:
    """GPU moves of the Reconciler (what it provides is declared for the type checker)."""

    if TYPE_CHECKING:
        allocator: GpuAllocator
        clock: Callable[[], float]
        _pools: dict[str, EndpointPool]
        _turns: dict[str, str]

        def _life(self, pool: EndpointPool, replica: Replica) -> ReplicaLifecycle: ...

        def _stop_soon(self, pool: EndpointPool, replica: Replica, reason: str) -> None: ...

        async def event(self, kind: str, message: str, endpoint: str | None = None,
                        replica: str | None = None) -> None: ...

        def kick(self) -> None: ...

        def live_pools(self) -> list[EndpointPool]: ...

    # --- GPUs out of service ------------------------------------------------------------------

    async def mark_gpu(self, uuid: str, kind: GpuMarkKind, reason: str) -> None:
        """Take a GPU out of service (stored first): it gets no new replica, and the replicas
        on it drain (their calls finish) while the passes start replacements elsewhere. A GPU
        marked so already keeps its first mark (and reason): nothing more happens."""
        if kind in self.allocator.marks(uuid):
            return
        await self.allocator.mark(GpuMark(uuid, kind, reason, self.clock()))
        await self.event(f"gpu_{kind.value}", f"GPU {uuid} {kind.value}: {reason}")
        on_it = {self.allocator.owners().get(uuid), self.allocator.loans().get(uuid),
                 *self.allocator.shares().get(uuid, {})}  # whole, borrowing or sharing
        for pool in self._pools.values():
            for rid in on_it:
                replica = pool.replicas.get(rid or "")
                if replica is not None and not self._life(pool, replica).stopping:
                    self._stop_soon(pool, replica, f"its GPU {uuid} is {kind.value}: {reason}")
        self.kick()

    async def gpu_sick(self, uuid: str, reason: str) -> None:
        """The health watch or the sampler found the GPU sick: out of service, once."""
        await self.mark_gpu(uuid, GpuMarkKind.UNHEALTHY, reason)

    async def unmark_gpu(self, uuid: str, kind: GpuMarkKind) -> bool:
        """Back in service (a no-op, False, when the GPU did not have the mark)."""
        if not await self.allocator.unmark(uuid, kind):
            return False
        back = "uncordoned" if kind is GpuMarkKind.CORDONED else "healthy again"
        await self.event(f"gpu_{back.split()[0]}", f"GPU {uuid} {back}")
        self.kick()
        return True

    # --- sleepers' GPUs: lent while they sleep, given back for a wake ----------------------

    async def _borrow(self, pool: EndpointPool, replica: Replica) -> list[Gpu] | None:
        """No GPU is free: borrow GPUs of sleeping replicas of other endpoints (of priority
        no higher than this one's) instead of stopping them."""
        spec, owners, loans = pool.spec, self.allocator.owners(), self.allocator.loans()
        lendable, owner_of = [], {}
        for other in self.live_pools():
            if other is pool or other.waiting + other.backlog:
                continue  # (a sleeper whose calls wait is about to wake: it lends nothing)
            for r in other.replicas.values():
                if r.state is not S.SLEEPING or self._settling(other, r):
                    continue
                for gpu in self.allocator.held_by(r.id):
                    if owners.get(gpu.uuid) == r.id and gpu.uuid not in loans:
                        lendable.append(LendableGpu(gpu.uuid, gpu.index, gpu.name,
                                                    other.spec.priority, r.idle_since))
                        owner_of[gpu.uuid] = r.id
        picked = pick_loan(lendable, spec.gpus, spec.gpu_type, spec.priority)
        if picked is None or not await self.allocator.lend(replica.id, picked):
            return None
        lenders = ", ".join(sorted({owner_of[u] for u in picked}))
        await self.event("gpu_lent", f"GPU(s) of sleeping {lenders} lent to {replica.id}",
                         pool.name, replica.id)
        return [g for g in self.allocator.gpus if g.uuid in picked]

    def _gpus_given_back(self, pool: EndpointPool, sleeper: Replica) -> bool:
        """Whether the sleeper (of `pool`) may wake now: every replica it lent its GPUs to or
        borrowed them from (lending_partners; not those sharing a GPU's memory with it) is
        asleep. If not, those plan_reclaim says are put to sleep (or stopped) now, and the
        wake waits for a later pass. One put to sleep for a co-tenant's wake waits for that
        wake first (turns): else, both busy, it could take the GPU back every time."""
        if self._turn_owed(sleeper):
            return False
        partners = lending_partners(sleeper.id, sleeper.gpus, self.allocator.owners(),
                                    self.allocator.loans())
        # (a pending partner holds the GPU already: its container is being created)
        cotenants = [(p, r) for p in self._pools.values() for r in p.replicas.values()
                     if r.id in partners and r.state not in (S.STOPPED, S.FAILED)]
        plan = plan_reclaim([CoTenant(r.id, r.state, r.in_flight, self._settling(p, r),
                                      p.spec.sleep is not None, p.spec.priority)
                             for p, r in cotenants], pool.spec.priority)
        for p, r in cotenants:
            why = f"its GPU is wanted by {sleeper.id}, waking"
            if r.id in plan.sleep:
                self._turns[r.id] = sleeper.id
                self._life(p, r).run(self._reclaim(p, r, why))
            elif r.id in plan.stop:
                self._stop_soon(p, r, why)
        return not plan.wait

    def _turn_owed(self, sleeper: Replica) -> bool:
        """Whether the sleeper was put to sleep for a co-tenant that has not woken yet and
        still has calls waiting for it (the turn is over once it woke, or wants nothing)."""
        waker = self._turns.get(sleeper.id)
        if waker is None:
            return False
        for p in self._pools.values():
            r = p.replicas.get(waker)
            if r is not None and r.state is S.SLEEPING and p.waiting + p.backlog and \
                    not self._life(p, r).stopping:
                return True
        del self._turns[sleeper.id]
        return False

    def _settling(self, pool: EndpointPool, replica: Replica) -> bool:
        """Stopping, or a sleeper still entering sleep or waking (a ready replica's task is
        its liveness watch: that is no reason to wait)."""
        life = self._life(pool, replica)
        return life.stopping or (replica.state is S.SLEEPING and life.busy)

    async def _reclaim(self, pool: EndpointPool, replica: Replica, why: str) -> None:
        await self.event("gpu_reclaim", f"{replica.id} put to sleep: {why}", pool.name,
                         replica.id)
        await self._life(pool, replica).sleep(f"put to sleep: {why}")
        self.kick()  # asleep: the waking one need not wait for the next timed pass

    async def _evict_for(self, pool: EndpointPool) -> bool:
        """Stop idle replicas of other endpoints so that a pending one of `pool` gets GPUs.

        True when GPUs are on their way (stops under way or just started)."""
        coming = sum(1 for p in self._pools.values() for r in p.replicas.values()
                     if (self._life(p, r).stopping or r.state is S.FAILED) and r.gpus)
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
            reason = (f"evicted: GPUs needed by {pool.name} (priority {spec.priority}, "
                      f"this endpoint {victim_pool.spec.priority})")
            await self.event("eviction", reason, victim_pool.name, rid)
            self._stop_soon(victim_pool, victim, reason)
        return bool(victims)

    def _eviction_candidates(self, pool: EndpointPool) -> list[EvictionCandidate]:
        """Idle GPU replicas of other endpoints, never taking one below its min_replicas."""
        names = {g.uuid: g.name for g in self.allocator.gpus}
        found = []
        for other in self._pools.values():
            if other is pool or other.spec.gpu_memory is not None:
                continue  # (stopping one sharer of a GPU frees no whole GPU: never a victim)
            live = [r for r in other.replicas.values()
                    if r.state in (S.STARTING, S.READY, S.SLEEPING)
                    and not self._life(other, r).stopping]
            idle = sorted((r for r in live if r.state in (S.READY, S.SLEEPING)
                           and r.in_flight == 0 and r.gpus), key=lambda r: r.idle_since)
            spare = max(0, len(live) - other.spec.min_replicas)
            found += [EvictionCandidate(r.id, other.name, other.spec.priority, r.idle_since,
                                        tuple(names.get(u, "") for u in r.gpus))
                      for r in idle[:spare]]
        return found
