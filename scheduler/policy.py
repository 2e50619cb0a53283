"""Pure scheduling decisions: functions of state and time, no I/O. Tested with tables."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from berth.scheduler.replica import Replica, ReplicaState

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0


def desired_replicas(demand: int, concurrency: int, min_replicas: int, max_replicas: int) -> int:
    """clamp(ceil(demand / concurrency), min_replicas, max_replicas)."""
    wanted = math.ceil(demand / concurrency) if demand > 0 else 0
    return max(min_replicas, min(wanted, max_replicas))


def backoff_delay(failures: int) -> float:
    """Wait before replacing a replica after `failures` failures in a row: 1 s doubling to 5 min."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_BASE_S * 2.0 ** min(failures - 1, 30), BACKOFF_MAX_S)


STABLE_AFTER_S = 60.0  # a replica ready this long before failing starts a fresh backoff count


def failures_after(previous: int, ready_at: float | None, now: float) -> int:
    """The failures-in-a-row count once a replica fails.

    A replica that crashes soon after becoming ready still counts as a failure in the row, so a
    model that crashes on its first call backs off like one that never starts.
    """
    if ready_at is not None and now - ready_at >= STABLE_AFTER_S:
        return 1
    return previous + 1


@dataclass(frozen=True)
class Plan:
    """What one reconcile pass should do to an endpoint's replicas."""

    start: int = 0
    stop: tuple[str, ...] = ()  # replica ids to drain and stop

    @property
    def empty(self) -> bool:
        return self.start == 0 and not self.stop


def plan_replicas(replicas: Sequence[Replica], generation: int, desired: int,
                  idle_timeout_s: float, now: float, may_start: bool,
                  remove_all: bool = False) -> Plan:
    """Start what is missing, roll old generations once new ones are ready, stop the idle excess.

    - Replicas of an older generation that are not ready yet are stopped at once; ready ones
      once the current generation has `desired` ready replicas (new ready before old stopped).
    - Excess current replicas: pending ones go first, then ready ones idle for idle_timeout_s
      (longest idle first). A replica with a call in flight is never picked.
    - remove_all (the endpoint was deleted): every replica is stopped; draining lets its
      calls finish.
    """
    S = ReplicaState
    active = [r for r in replicas if r.state in (S.PENDING, S.STARTING, S.READY, S.SLEEPING)]
    if remove_all:
        return Plan(stop=tuple(r.id for r in active))
    current = [r for r in active if r.generation == generation]
    old = [r for r in active if r.generation != generation]
    ready_now = sum(1 for r in current if r.state is S.READY)
    stop = [r.id for r in old if r.state is not S.READY or ready_now >= desired]
    start = max(0, desired - len(current)) if may_start else 0
    excess = len(current) - desired
    if excess > 0:
        pending = [r for r in current if r.state is S.PENDING]
        idle = sorted((r for r in current if r.state in (S.READY, S.SLEEPING)
                       and r.in_flight == 0 and now - r.idle_since >= idle_timeout_s),
                      key=lambda r: r.idle_since)
        stop += [r.id for r in (pending + idle)[:excess]]
    return Plan(start=start, stop=tuple(stop))


def plan_sleeps(replicas: Sequence[Replica], generation: int, after_s: float,
                now: float) -> list[str]:
    """Ready replicas of the current generation with no call for `after_s`: to sleep."""
    return [r.id for r in replicas
            if r.state is ReplicaState.READY and r.generation == generation
            and r.in_flight == 0 and now - r.idle_since >= after_s]


def plan_wakes(replicas: Sequence[Replica], waking: frozenset[str], waiting: int,
               concurrency: int) -> list[str]:
    """Sleeping replicas to wake for `waiting` calls: as many as the calls need beyond the
    slots already coming (replicas starting or waking), most recently used first."""
    S = ReplicaState
    coming = sum(1 for r in replicas if r.state is S.STARTING or r.id in waking)
    needed = -(-waiting // concurrency) - coming
    asleep = sorted((r for r in replicas if r.state is S.SLEEPING and r.id not in waking),
                    key=lambda r: -r.idle_since)
    return [r.id for r in asleep[:max(0, needed)]]


def pick_replica(replicas: Iterable[Replica], concurrency: int, turn: int,
                 exclude: frozenset[str] = frozenset()) -> Replica | None:
    """Round-robin: the first ready replica with a free slot, starting at position `turn`."""
    ready = [r for r in replicas if r.state is ReplicaState.READY and r.id not in exclude]
    for i in range(len(ready)):
        replica = ready[(turn + i) % len(ready)]
        if replica.in_flight < concurrency:
            return replica
    return None


@dataclass(frozen=True)
class EvictionCandidate:
    """An idle replica of another endpoint, as eviction sees it."""

    replica: str
    endpoint: str
    priority: int
    idle_since: float
    gpus: tuple[str, ...]  # names of the GPUs it holds, for gpu_type matching


def pick_evictions(candidates: Sequence[EvictionCandidate], needed: int, free_matching: int,
                   gpu_type: str | None, priority: int) -> list[str]:
    """Replicas to stop so that `needed` GPUs matching gpu_type come free, or [] if they cannot.

    Lowest priority first, then least recently used; never an endpoint of higher priority
    than the one asking. Callers pass only idle replicas above their endpoint's min_replicas.
    """
    kind = (gpu_type or "").lower()
    order = sorted((c for c in candidates if c.priority <= priority),
                   key=lambda c: (c.priority, c.idle_since))
    chosen, freed = [], free_matching
    for c in order:
        if freed >= needed:
            break
        gain = sum(1 for name in c.gpus if kind in name.lower())
        if gain:
            chosen.append(c.replica)
            freed += gain
    return chosen if freed >= needed else []


# --- lending a sleeping replica's GPUs ---------------------------------------------------------

@dataclass(frozen=True)
class LendableGpu:
    """A GPU held whole by a sleeping replica of another endpoint, not lent yet."""

    uuid: str
    index: int
    name: str
    owner_priority: int
    owner_idle_since: float


def pick_loan(lendable: Sequence[LendableGpu], count: int, gpu_type: str | None,
              priority: int) -> list[str] | None:
    """`count` GPUs of sleepers to lend to a replica of `priority` (never a sleeper of higher
    priority's): lowest priority first, then the longest asleep; None if too few."""
    kind = (gpu_type or "").lower()
    usable = sorted((g for g in lendable if g.owner_priority <= priority
                     and kind in g.name.lower()),
                    key=lambda g: (g.owner_priority, g.owner_idle_since, g.index))
    return [g.uuid for g in usable[:count]] if 0 < count <= len(usable) else None


def lending_partners(sleeper: str, gpus: Iterable[str], owners: Mapping[str, str],
                     loans: Mapping[str, str]) -> set[str]:
    """Whom a sleeper must get its GPUs back from to wake: the borrower of a GPU it holds,
    or the holder of one it borrowed (`owners` and `loans`: GPU uuid -> replica id). A
    replica sharing a GPU's memory with it is neither: shares are never lent, and sharers run
    side by side."""
    partners = {rid for uuid in gpus for rid in (owners.get(uuid), loans.get(uuid))
                if rid is not None}
    partners.discard(sleeper)
    return partners


@dataclass(frozen=True)
class CoTenant:
    """Another replica on a GPU that a sleeper wants to wake on (a lender or a borrower)."""

    replica: str
    state: ReplicaState
    in_flight: int
    busy: bool  # entering sleep, waking or stopping right now
    can_sleep: bool  # its endpoint has a sleep tier
    priority: int = 0  # its endpoint's


@dataclass(frozen=True)
class Reclaim:
    sleep: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    wait: bool = False  # some co-tenant cannot give the GPU back yet


def plan_reclaim(cotenants: Sequence[CoTenant], priority: int = 0) -> Reclaim:
    """What frees a GPU for a waking sleeper of `priority`: one awake replica per GPU. Ready
    co-tenants go to sleep (or stop, without a sleep tier): an idle one at once, one with
    calls in flight too when its endpoint's priority is no higher than the sleeper's (its
    calls finish, new ones wait: never put to sleep, a co-tenant that is never idle would keep
    the GPU for ever). Waited for: those busy with a move, starting, or of higher priority
    with calls; settled sleepers are left as they are."""
    S = ReplicaState
    sleep: list[str] = []
    stop: list[str] = []
    wait = False
    for c in cotenants:
        if c.state is S.SLEEPING and not c.busy:
            continue
        if c.state is S.READY and not c.busy and (c.in_flight == 0 or c.priority <= priority):
            (sleep if c.can_sleep else stop).append(c.replica)
        wait = True  # until what was asked (or what runs) has settled
    return Reclaim(tuple(sleep), tuple(stop), wait)
