"""GPU allocator over a real SQLite store: property-based, no double booking, no leaks."""

from __future__ import annotations

import asyncio
import tempfile
from itertools import combinations
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from berth.gpu import GpuAllocator, choose_gpus, choose_shared_gpu
from berth.gpu.inventory import NVLINK, SYSTEM, Gpu, Topology
from berth.store import Store

GPUS = [Gpu(0, "u0", "NVIDIA H100", 80), Gpu(1, "u1", "NVIDIA H100", 80),
        Gpu(2, "u2", "NVIDIA A10", 24), Gpu(3, "u3", "NVIDIA H100", 80)]

ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 7), st.integers(0, 3),
              st.sampled_from([None, "H100", "A10", "B200"])),
    st.tuples(st.just("free"), st.integers(0, 7)),
    st.tuples(st.just("restart")),
), max_size=40)


async def run_ops(state_dir: Path, steps: list[tuple]) -> None:
    store = await Store.open(state_dir)
    allocator = GpuAllocator(GPUS, store)
    await allocator.load()
    model: dict[str, list[str]] = {}  # replica -> GPUs it was given
    for step in steps:
        if step[0] == "alloc":
            _, n, count, kind = step
            rid = f"r{n}"
            got = await allocator.allocate(rid, count, kind)
            if got is not None:
                assert len(got) == count
                assert all(kind is None or kind in g.name for g in got)
                model[rid] = [g.uuid for g in got]
            else:
                model.pop(rid, None)  # holdings that did not fit were given back
        elif step[0] == "free":
            await allocator.free(f"r{step[1]}")
            model.pop(f"r{step[1]}", None)
        else:  # a berthd restart: memory is rebuilt from SQLite alone
            await store.close()
            store = await Store.open(state_dir)
            allocator = GpuAllocator(GPUS, store)
            await allocator.load()
        owners = allocator.owners()
        # No GPU is held by two replicas, memory agrees with SQLite, nothing leaks.
        assert owners == await store.gpu_owners()
        held = [u for uuids in model.values() for u in uuids]
        assert len(held) == len(set(held))
        assert owners == {u: r for r, uuids in model.items() for u in uuids}
    for rid in list(model):
        await allocator.free(rid)
    assert allocator.owners() == {} and await store.gpu_owners() == {}
    await store.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_random_allocate_free_never_double_books_or_leaks(steps):
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run_ops(Path(tmp), steps))


async def test_concurrent_allocations_never_share_a_gpu(tmp_path):
    store = await Store.open(tmp_path)
    allocator = GpuAllocator(GPUS, store)
    results = await asyncio.gather(*(allocator.allocate(f"r{i}", 1, None) for i in range(10)))
    granted = [g.uuid for r in results if r for g in r]
    assert sorted(granted) == ["u0", "u1", "u2", "u3"]
    assert sum(1 for r in results if r is None) == 6
    await store.close()


async def test_the_sqlite_constraint_wins_over_a_stale_memory(tmp_path):
    store = await Store.open(tmp_path)
    allocator = GpuAllocator(GPUS, store)
    await store.claim_gpus("intruder", ["u0"])  # written behind the allocator's back
    got = await allocator.allocate("r1", 1, None)
    assert got is None  # refused by the unique constraint, not handed out twice
    assert allocator.owners() == {"u0": "intruder"}  # and memory now agrees with SQLite
    got = await allocator.allocate("r1", 1, None)
    assert got is not None and got[0].uuid == "u1"
    await store.close()


async def test_owners_of_gpus_the_box_no_longer_has_are_dropped(tmp_path):
    store = await Store.open(tmp_path)
    await store.claim_gpus("old", ["gone-gpu"])
    allocator = GpuAllocator(GPUS, store)
    await allocator.load()
    assert allocator.owners() == {} and await store.gpu_owners() == {}
    await store.close()


def test_choose_gpus_table():
    assert [g.index for g in choose_gpus(GPUS, {}, 2, "H100")] == [0, 1]
    assert [g.index for g in choose_gpus(GPUS, {"u0": "x"}, 2, "h100")] == [1, 3]
    assert choose_gpus(GPUS, {"u0": "x", "u1": "y"}, 2, "H100") is None
    assert [g.index for g in choose_gpus(GPUS, {}, 1, "A10")] == [2]
    assert choose_gpus(GPUS, {}, 0, "B200") == []


# --- sharing GPUs by memory (gpu_memory) -----------------------------------------------------

SHARED = [Gpu(0, "s0", "NVIDIA H100", 8192), Gpu(1, "s1", "NVIDIA H100", 8192),
          Gpu(2, "s2", "NVIDIA A10", 4096)]
RESERVE = 1024

share_ops = st.lists(st.one_of(
    st.tuples(st.just("whole"), st.integers(0, 7), st.integers(1, 2),
              st.sampled_from([None, "H100", "A10"])),
    st.tuples(st.just("share"), st.integers(0, 7), st.sampled_from([512, 1024, 3000, 7168]),
              st.sampled_from([None, "H100", "A10"])),
    st.tuples(st.just("free"), st.integers(0, 7)),
    st.tuples(st.just("restart")),
), max_size=40)


async def check_shares(allocator: GpuAllocator, store: Store) -> None:
    """Memory agrees with SQLite; no GPU is both held whole and shared; no GPU overfills."""
    owners, shares = allocator.owners(), allocator.shares()
    assert owners == await store.gpu_owners()
    stored: dict[str, dict[str, int]] = {}
    for uuid, replica, mib in await store.gpu_shares():
        stored.setdefault(uuid, {})[replica] = mib
    assert shares == stored
    assert not set(owners) & set(shares)
    for gpu in SHARED:
        assert sum(shares.get(gpu.uuid, {}).values()) <= gpu.memory_mib - RESERVE
    sharers = [r for s in shares.values() for r in s]
    assert len(sharers) == len(set(sharers))  # one share per replica
    assert not set(sharers) & set(owners.values())  # a replica is whole or sharing, not both


async def run_share_ops(state_dir: Path, steps: list[tuple]) -> None:
    store = await Store.open(state_dir)
    allocator = GpuAllocator(SHARED, store, RESERVE)
    await allocator.load()
    for step in steps:
        if step[0] in ("whole", "share"):
            _, n, amount, kind = step
            memory = amount if step[0] == "share" else None
            got = await allocator.allocate(f"r{n}", 1 if memory else amount, kind, memory)
            if got is not None:
                assert len(got) == (1 if memory else amount)
                assert all(kind is None or kind in g.name for g in got)
        elif step[0] == "free":
            await allocator.free(f"r{step[1]}")
        else:  # a berthd restart: memory is rebuilt from SQLite alone
            await store.close()
            store = await Store.open(state_dir)
            allocator = GpuAllocator(SHARED, store, RESERVE)
            await allocator.load()
        await check_shares(allocator, store)
    for n in range(8):
        await allocator.free(f"r{n}")
    assert allocator.shares() == {} and await store.gpu_shares() == []
    await store.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(share_ops)
def test_random_shares_and_whole_gpus_never_overfill_mix_or_leak(steps):
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run_share_ops(Path(tmp), steps))


async def test_the_store_itself_refuses_to_mix_or_overfill(tmp_path):
    store = await Store.open(tmp_path)
    assert await store.claim_share("a", "s0", 4000, 7168)
    assert not await store.claim_share("b", "s0", 4000, 7168)  # the sum would pass capacity
    assert await store.claim_share("b", "s0", 3168, 7168)
    assert not await store.claim_gpus("w", ["s0"])  # shared: the trigger refuses it whole
    assert await store.claim_gpus("w", ["s1"])
    assert not await store.claim_share("c", "s1", 1, 7168)  # held whole: no share
    assert not await store.claim_share("a", "s0", 1, 7168)  # one share per replica and GPU
    await store.release_gpus("a")
    assert await store.gpu_shares() == [("s0", "b", 3168)]
    await store.close()


def test_choose_shared_gpu_is_best_fit():
    def pick(shares, mib, owners=None, kind=None, unusable=()):
        gpu = choose_shared_gpu(SHARED, owners or {}, shares, mib, RESERVE, kind, unusable)
        return None if gpu is None else gpu.index

    assert pick({}, 1000) == 2  # the smallest GPU that fits: big ones stay whole
    assert pick({}, 4000) == 0  # the A10 (3072 usable) is too small
    assert pick({"s1": {"x": 5000}}, 2000) == 1  # a shared GPU fills up before a free one
    assert pick({"s1": {"x": 5000}}, 2500) == 2  # ...if it has room: the A10 fits best
    assert pick({"s1": {"x": 5000}}, 3100) == 0  # neither has room: a free H100 is broken into
    assert pick({}, 1000, kind="H100") == 0
    assert pick({}, 1000, owners={"s2": "w"}) == 0  # held whole: not shared
    assert pick({}, 1000, unusable={"s2", "s0"}) == 1  # cordoned or sick: skipped
    assert pick({}, 7169) is None  # more than any GPU has beside the reserve


# --- topology-aware placement ------------------------------------------------------------------

EIGHT = [Gpu(i, f"t{i}", "NVIDIA H100", 80) for i in range(8)]


def eight_gpu_box() -> Topology:
    """Two NVLink islands of four (0-3, 4-7); inside an island pairs also share a PCIe switch
    (0-1, 2-3...); islands meet only across the NUMA nodes (SYSTEM)."""
    ranks = {}
    for a, b in combinations(range(8), 2):
        rank = NVLINK if a // 4 == b // 4 else SYSTEM
        ranks[frozenset((f"t{a}", f"t{b}"))] = rank
    return Topology(ranks)


@pytest.mark.parametrize(("held", "count", "chosen"), [
    ([], 2, [0, 1]),                      # an NVLink pair, lowest indexes
    ([1, 2], 2, [0, 3]),                  # still NVLinked across the held ones
    ([0, 1, 2], 2, [4, 5]),               # 3 is alone on its island: a pair on the other
    ([], 4, [0, 1, 2, 3]),                # a whole island
    ([0], 4, [4, 5, 6, 7]),               # the island with four free, not 1-3 plus one across
    ([0, 4, 5, 6], 4, [1, 2, 3, 7]),      # no island has four: what is left
])
def test_choose_gpus_by_topology(held, count, chosen):
    owners = {f"t{i}": "x" for i in held}
    got = choose_gpus(EIGHT, owners, count, None, (), eight_gpu_box())
    assert got is not None and [g.index for g in got] == chosen


def test_one_gpu_goes_where_it_breaks_no_nvlink_pair():
    four = EIGHT[:4]
    pairs = Topology({frozenset(("t0", "t1")): NVLINK, frozenset(("t2", "t3")): NVLINK})
    owners = {"t2": "x"}  # 3 has lost its partner; 0-1 is a whole pair
    [one] = choose_gpus(four, owners, 1, None, (), pairs) or []
    assert one.index == 3  # lowest index (0) would have broken the pair
    owners["t3"] = "y"
    assert [g.index for g in choose_gpus(four, owners, 2, None, (), pairs) or []] == [0, 1]
    careless = choose_gpus(four, {"t2": "x"}, 1, None)  # without topology: lowest index
    assert careless is not None and careless[0].index == 0


def test_topology_from_nvml_and_from_static_groups():
    from berth.daemon.config import parse_config
    from berth.gpu.inventory import NvmlInventory, static_inventory
    from berth.gpu.nvml_replay import ReplayNvml

    nvml = NvmlInventory(ReplayNvml.load(Path(__file__).parent / "fixtures" / "nvml-4xh100.json"))
    u = [g.uuid for g in nvml.gpus]
    assert nvml.topology.rank(u[0], u[1]) == NVLINK and nvml.topology.rank(u[0], u[2]) == SYSTEM
    config = parse_config({"gpu": {"source": "static", "devices": [
        {"name": "A", "memory_mib": 1, "nvlink_group": "x"},
        {"name": "A", "memory_mib": 1}, {"name": "A", "memory_mib": 1, "nvlink_group": "x"}]}})
    static = static_inventory(config.gpu.devices)
    got = choose_gpus(static.gpus, {}, 2, None, (), static.topology)
    assert [g.index for g in got or []] == [0, 2]  # the group, not the lowest indexes


async def test_only_a_held_gpu_is_lent_and_once(tmp_path):
    store = await Store.open(tmp_path)
    allocator = GpuAllocator(GPUS, store)
    assert not await allocator.lend("b", ["u0"])  # nobody holds it: nothing to lend
    assert await allocator.allocate("sleeper", 1, None) is not None
    assert await allocator.lend("b", ["u0"]) and not await allocator.lend("c", ["u0"])
    assert allocator.loans() == {"u0": "b"} and await store.gpu_loans() == {"u0": "b"}
    await allocator.free("b")
    assert allocator.loans() == {} and allocator.owners() == {"u0": "sleeper"}
    await store.close()
