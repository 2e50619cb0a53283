"""GPU allocator: whole GPUs to replicas, or shares of one GPU's memory (`gpu_memory`).

A GPU holds either one whole-GPU replica or shared replicas, never both, and its shares never
add up to more than its memory minus `gpu.reserve_memory`. Ownership and shares live in memory
for fast decisions and in a ledger (the SQLite store, whose constraints and checked inserts
are the last word) so that a restart or a bug cannot hand a GPU out twice or overfill it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import combinations
from typing import Protocol

from berth.gpu.inventory import SWITCH, Gpu, Topology


class GpuMarkKind(StrEnum):
    """Why a GPU gets no new replica: an admin cordoned it, or berth found it sick."""

    CORDONED = "cordoned"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class GpuMark:
    uuid: str
    kind: GpuMarkKind
    reason: str
    since: float


class GpuLedger(Protocol):
    """Durable record of GPU ownership (implemented by the store)."""

    async def claim_gpus(self, replica_id: str, uuids: Sequence[str]) -> bool:
        """Record all of `uuids` as held by the replica, or none and False if any is held."""
        ...

    async def release_gpus(self, replica_id: str) -> None: ...

    async def gpu_owners(self) -> dict[str, str]: ...

    async def claim_share(self, replica_id: str, uuid: str, memory_mib: int,
                          capacity_mib: int) -> bool:
        """Record the share unless the GPU is held whole or the shares would pass capacity."""
        ...

    async def gpu_shares(self) -> list[tuple[str, str, int]]:
        """(GPU uuid, replica id, MiB) of every share."""
        ...

    async def lend_gpus(self, borrower: str, uuids: Sequence[str]) -> bool:
        """Record every GPU as lent to `borrower`, or none and False if one is lent already."""
        ...

    async def gpu_loans(self) -> dict[str, str]:
        """GPU uuid -> borrower replica id."""
        ...

    async def gpu_marks(self) -> list[GpuMark]: ...

    async def set_gpu_mark(self, mark: GpuMark) -> None: ...

    async def clear_gpu_mark(self, uuid: str, kind: GpuMarkKind) -> bool:
        """Forget the mark; False if there was none."""
        ...


def matches(gpu: Gpu, gpu_type: str | None) -> bool:
    return gpu_type is None or gpu_type.lower() in gpu.name.lower()


def choose_gpus(gpus: Sequence[Gpu], owners: Mapping[str, str], count: int,
                gpu_type: str | None, unusable: Collection[str] = (),
                topology: Topology | None = None) -> list[Gpu] | None:
    """`count` free GPUs matching `gpu_type` (none of `unusable`: cordoned, sick, shared or
    lent), or None if too few are free. Several GPUs: the best connected set (its worst link
    first: NVLink, then one PCIe switch, host bridge, NUMA node). One GPU: the one with the
    fewest well-linked free peers, so that well-connected sets stay whole for bigger asks.
    Ties go to the lowest indexes."""
    free = [g for g in gpus if g.uuid not in owners and g.uuid not in unusable
            and matches(g, gpu_type) and not (g.mig and count > 1)]  # one MIG device each
    if len(free) < count:
        return None
    if topology is None or count == 0:
        return free[:count]
    if count == 1:
        return [min(free, key=lambda g: (good_peers(g, free, topology), g.index))]
    return list(min(combinations(free, count), key=lambda s: (
        max(topology.rank(a.uuid, b.uuid) for a, b in combinations(s, 2)),
        sum(topology.rank(a.uuid, b.uuid) for a, b in combinations(s, 2)),
        [g.index for g in s])))


def good_peers(gpu: Gpu, free: Sequence[Gpu], topology: Topology) -> int:
    """Free GPUs linked to `gpu` by NVLink or one PCIe switch."""
    return sum(1 for g in free if g is not gpu and topology.rank(gpu.uuid, g.uuid) <= SWITCH)


def choose_shared_gpu(gpus: Sequence[Gpu], owners: Mapping[str, str],
                      shares: Mapping[str, Mapping[str, int]], memory_mib: int,
                      reserve_mib: int, gpu_type: str | None,
                      unusable: Collection[str] = ()) -> Gpu | None:
    """Best fit: of the GPUs not held whole that have room for `memory_mib`, the one left
    with the least room after it (shared GPUs fill up before a free one is broken into);
    ties go to the lowest index."""
    fits = [(g.memory_mib - reserve_mib - sum(shares.get(g.uuid, {}).values()) - memory_mib,
             g.index, g) for g in gpus
            if g.uuid not in owners and g.uuid not in unusable and matches(g, gpu_type)]
    room = [f for f in fits if f[0] >= 0]
    return min(room, key=lambda f: (f[0], f[1]))[2] if room else None


class GpuAllocator:
    """Hands whole GPUs, or shares of a GPU's memory, to replicas and takes them back. Safe
    under concurrent tasks."""

    def __init__(self, gpus: Sequence[Gpu], ledger: GpuLedger, reserve_mib: int = 1024,
                 topology: Topology | None = None) -> None:
        self.gpus = tuple(gpus)
        self.reserve_mib = reserve_mib
        self.topology = topology or Topology()
        self._ledger = ledger
        self._owners: dict[str, str] = {}
        self._shares: dict[str, dict[str, int]] = {}  # uuid -> replica -> MiB
        self._loans: dict[str, str] = {}  # uuid of a sleeper's GPU -> the replica borrowing it
        self._marks: dict[str, dict[GpuMarkKind, GpuMark]] = {}  # uuid -> its marks
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """Take ownership as the ledger has it; rows for GPUs this box no longer has are dropped."""
        known = {g.uuid for g in self.gpus}
        owners = await self._ledger.gpu_owners()
        for replica in {r for u, r in owners.items() if u not in known}:
            await self._ledger.release_gpus(replica)
        self._owners = {u: r for u, r in owners.items() if u in known}
        self._shares = {}
        for uuid, replica, mib in await self._ledger.gpu_shares():
            if uuid in known:
                self._shares.setdefault(uuid, {})[replica] = mib
            else:
                await self._ledger.release_gpus(replica)
        loans = await self._ledger.gpu_loans()
        for borrower in {b for u, b in loans.items() if u not in known}:
            await self._ledger.release_gpus(borrower)
        self._loans = {u: b for u, b in loans.items() if u in known}
        self._marks = {}
        for mark in await self._ledger.gpu_marks():
            self._marks.setdefault(mark.uuid, {})[mark.kind] = mark

    def marks(self, uuid: str) -> dict[GpuMarkKind, GpuMark]:
        """The GPU's marks (cordoned, unhealthy), empty when it is usable."""
        return dict(self._marks.get(uuid, {}))

    async def mark(self, mark: GpuMark) -> None:
        """The GPU gets no new replica until the mark is cleared (stored first)."""
        await self._ledger.set_gpu_mark(mark)
        self._marks.setdefault(mark.uuid, {})[mark.kind] = mark

    async def unmark(self, uuid: str, kind: GpuMarkKind) -> bool:
        """Clear one mark; False if the GPU did not have it."""
        had = await self._ledger.clear_gpu_mark(uuid, kind)
        marks = self._marks.get(uuid, {})
        marks.pop(kind, None)
        if not marks:
            self._marks.pop(uuid, None)
        return had

    def owners(self) -> dict[str, str]:
        """GPU uuid -> replica id, for every held GPU."""
        return dict(self._owners)

    def shares(self) -> dict[str, dict[str, int]]:
        """GPU uuid -> {replica id: MiB} for every GPU shared by memory."""
        return {u: dict(s) for u, s in self._shares.items()}

    def loans(self) -> dict[str, str]:
        """GPU uuid -> the replica that borrows it from its sleeping holder."""
        return dict(self._loans)

    def held_by(self, replica_id: str) -> list[Gpu]:
        return [g for g in self.gpus if self._owners.get(g.uuid) == replica_id
                or replica_id in self._shares.get(g.uuid, {})
                or self._loans.get(g.uuid) == replica_id]

    def _unusable(self) -> set[str]:
        """GPUs no whole-GPU replica may get: marked, shared by memory, or lent."""
        return {*self._marks, *(u for u, s in self._shares.items() if s), *self._loans}

    async def lend(self, borrower: str, uuids: Sequence[str]) -> bool:
        """Lend GPUs held by sleepers to `borrower` (stored first); False if one is lent,
        marked or shared meanwhile."""
        async with self._lock:
            if any(u in self._loans or u in self._marks or u in self._shares
                   or u not in self._owners for u in uuids):  # only a holder's GPU is lent
                return False
            if not await self._ledger.lend_gpus(borrower, uuids):
                await self.load()
                return False
            self._loans.update(dict.fromkeys(uuids, borrower))
            return True

    def free_count(self, gpu_type: str | None) -> int:
        unusable = self._unusable()
        return sum(1 for g in self.gpus if g.uuid not in self._owners
                   and g.uuid not in unusable and matches(g, gpu_type))

    def can_ever_fit(self, count: int, gpu_type: str | None, memory_mib: int | None = None
                     ) -> bool:
        """Whether the box has enough matching GPUs at all, free or not."""
        if memory_mib:
            return any(matches(g, gpu_type) and g.memory_mib - self.reserve_mib >= memory_mib
                       for g in self.gpus)
        return sum(1 for g in self.gpus if matches(g, gpu_type)
                   and not (g.mig and count > 1)) >= count

    async def allocate(self, replica_id: str, count: int, gpu_type: str | None,
                       memory_mib: int | None = None) -> list[Gpu] | None:
        """Exactly `count` GPUs matching gpu_type for the replica, or None if too few are free;
        with `memory_mib`, a share of that much memory on one GPU (best fit).

        GPUs it already holds are kept when they fit the request; otherwise they are given
        back first (holdings never change shape by design, so this is only a safety net).
        """
        if memory_mib:
            return await self._allocate_share(replica_id, memory_mib, gpu_type)
        async with self._lock:
            held = self.held_by(replica_id)
            if len(held) == count and all(matches(g, gpu_type) and g.uuid not in self._marks
                                          and self._owners.get(g.uuid) == replica_id
                                          for g in held):
                return held
            if held:
                await self._release(replica_id)
            chosen = choose_gpus(self.gpus, self._owners, count, gpu_type, self._unusable(),
                                 self.topology)
            if chosen is None:
                return None
            if count and not await self._ledger.claim_gpus(replica_id, [g.uuid for g in chosen]):
                await self.load()  # memory and ledger disagree: the ledger wins
                return None
            for gpu in chosen:
                self._owners[gpu.uuid] = replica_id
            return chosen

    async def _allocate_share(self, replica_id: str, memory_mib: int,
                              gpu_type: str | None) -> list[Gpu] | None:
        async with self._lock:
            held = self.held_by(replica_id)
            if len(held) == 1 and self._shares.get(held[0].uuid, {}).get(replica_id) == \
                    memory_mib and held[0].uuid not in self._marks and \
                    matches(held[0], gpu_type):
                return held
            if held:
                await self._release(replica_id)
            gpu = choose_shared_gpu(self.gpus, self._owners, self._shares, memory_mib,
                                    self.reserve_mib, gpu_type, {*self._marks, *self._loans})
            if gpu is None:
                return None
            if not await self._ledger.claim_share(replica_id, gpu.uuid, memory_mib,
                                                  gpu.memory_mib - self.reserve_mib):
                await self.load()  # memory and ledger disagree: the ledger wins
                return None
            self._shares.setdefault(gpu.uuid, {})[replica_id] = memory_mib
            return [gpu]

    async def free(self, replica_id: str) -> None:
        """Give back every GPU the replica holds (no-op when it holds none)."""
        async with self._lock:
            await self._release(replica_id)

    async def _release(self, replica_id: str) -> None:
        await self._ledger.release_gpus(replica_id)
        self._owners = {u: r for u, r in self._owners.items() if r != replica_id}
        self._loans = {u: b for u, b in self._loans.items() if b != replica_id}
        for uuid in [u for u, s in self._shares.items() if replica_id in s]:
            del self._shares[uuid][replica_id]
            if not self._shares[uuid]:
                del self._shares[uuid]
