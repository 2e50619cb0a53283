"""GPU inventory: which GPUs the box has, from NVML, from the config (static), or none.

Knows nothing of Docker or HTTP. NVML calls block; callers run `sample()` off the event loop.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

log = structlog.get_logger("berth.gpu")


@dataclass(frozen=True)
class Gpu:
    """An allocatable unit: a whole GPU, or a MIG device (`mig`; index: its GPU's)."""

    index: int
    uuid: str
    name: str
    memory_mib: int
    mig: bool = False


# How well two GPUs are connected, best first (NVML's topology levels, NVLink apart).
NVLINK, SWITCH, HOSTBRIDGE, NODE, SYSTEM = range(5)
ANCESTOR_RANK = {0: SWITCH, 10: SWITCH, 20: SWITCH, 30: HOSTBRIDGE, 40: NODE, 50: SYSTEM}
NVML_P2P_CAPS_INDEX_NVLINK = 3
# NVML errors that mean NVML itself is gone, not one GPU: uninitialized, driver not loaded,
# library not found, driver/library version mismatch (a driver upgrade under way).
DRIVER_GONE = frozenset({1, 9, 12, 18})
RETRY_MIN_S, RETRY_MAX_S = 5.0, 300.0


@dataclass(frozen=True)
class Topology:
    """Pairwise links between GPUs (by uuid); pairs not known count as SYSTEM (the worst)."""

    ranks: Mapping[frozenset[str], int] = field(default_factory=dict)

    def rank(self, a: str, b: str) -> int:
        return self.ranks.get(frozenset((a, b)), SYSTEM)


def group_topology(gpus: Sequence[Gpu], groups: Sequence[str | None]) -> Topology:
    """Static GPUs: the same `nvlink_group` means NVLink, anything else SYSTEM."""
    return Topology({frozenset((a.uuid, b.uuid)): NVLINK
                     for a, ga in zip(gpus, groups, strict=True)
                     for b, gb in zip(gpus, groups, strict=True)
                     if a.uuid != b.uuid and ga is not None and ga == gb})


@dataclass
class GpuReadings:
    """Whether GPU readings can be had now: not while NVML itself does not answer (a driver
    upgrade). The views and /healthz say so; nothing is marked sick for it."""

    available: bool = True
    since: float = 0.0  # unix time readings stopped
    why: str = ""


@dataclass(frozen=True)
class GpuProcess:
    """A process using a GPU, as NVML lists it (host PID), with the container it runs in."""

    pid: int
    used_mib: int
    container: str | None  # the full id of the Docker container owning the PID, if any


@dataclass(frozen=True)
class GpuSample:
    """Live readings of one GPU; None where the source cannot tell."""

    utilization_pct: int | None = None
    memory_used_mib: int | None = None
    temperature_c: int | None = None
    processes: tuple[GpuProcess, ...] = ()


CGROUP_CONTAINER = re.compile(r"(?:/docker/|/docker-|docker-)([0-9a-f]{64})(?:\.scope)?")


def container_in_cgroup(text: str) -> str | None:
    """The Docker container id in a /proc/PID/cgroup text (cgroupfs `/docker/ID` or systemd
    `docker-ID.scope`), None for a process outside any container."""
    found = CGROUP_CONTAINER.findall(text)
    return found[-1] if found else None


def container_of_pid(pid: int, proc: str = "/proc") -> str | None:
    try:
        return container_in_cgroup(Path(proc, str(pid), "cgroup").read_text())
    except OSError:  # gone already, or another PID namespace
        return None


def attribute(samples: Mapping[str, GpuSample], replica_of: Mapping[str, str]
              ) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """GPU memory in use by replica and by nobody: (replica -> GPU uuid -> MiB, GPU uuid ->
    MiB of processes in no replica's container). `replica_of`: container id -> replica id."""
    by_replica: dict[str, dict[str, int]] = {}
    nobody: dict[str, int] = {}
    for uuid, sample in samples.items():
        for p in sample.processes:
            replica = replica_of.get(p.container or "")
            if replica is None:
                nobody[uuid] = nobody.get(uuid, 0) + p.used_mib
            else:
                per_gpu = by_replica.setdefault(replica, {})
                per_gpu[uuid] = per_gpu.get(uuid, 0) + p.used_mib
    return by_replica, nobody


class GpuSourceError(Exception):
    """The configured GPU source cannot be used (NVML missing, no driver...)."""


class Inventory(Protocol):
    source: str
    topology: Topology
    readings: GpuReadings

    @property
    def gpus(self) -> Sequence[Gpu]: ...

    def sample(self) -> dict[str, GpuSample]: ...

    def close(self) -> None: ...


@dataclass
class StaticInventory:
    """GPUs declared in the config: development and CI boxes without NVIDIA GPUs."""

    gpus: Sequence[Gpu] = field(default_factory=tuple)
    source: str = "static"
    topology: Topology = field(default_factory=Topology)
    readings: GpuReadings = field(default_factory=GpuReadings)

    def sample(self) -> dict[str, GpuSample]:
        return {}

    def close(self) -> None:
        pass


def static_inventory(devices: Sequence[Any]) -> StaticInventory:
    """Inventory from `[[gpu.devices]]` tables (objects with name, memory_mib, uuid)."""
    gpus = [
        Gpu(index=i, uuid=d.uuid or f"static-{i}", name=d.name, memory_mib=d.memory_mib,
            mig=bool(getattr(d, "mig", False)))
        for i, d in enumerate(devices)
    ]
    groups = [getattr(d, "nvlink_group", None) for d in devices]
    return StaticInventory(gpus=tuple(gpus), topology=group_topology(gpus, groups))


def no_gpus() -> StaticInventory:
    return StaticInventory(gpus=(), source="none")


class NvmlInventory:
    """GPUs as the NVIDIA driver reports them, through nvidia-ml-py."""

    source = "nvml"

    def __init__(self, nvml: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        if nvml is None:  # the driver's; tests hand in berth.gpu.nvml_replay.ReplayNvml
            import pynvml as driver
            nvml = driver
        self.nvml = pynvml = nvml
        self.clock = clock
        self.lost: dict[str, str] = {}  # uuid -> why, for GPUs whose sampling found them lost
        self.readings = GpuReadings()  # unavailable while NVML itself does not answer
        self.retry_s, self.retry_at = RETRY_MIN_S, 0.0
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuSourceError(
                f"NVML cannot be used ({exc}); on a machine without "
                "NVIDIA GPUs or driver set gpu.source = \"static\" and declare [[gpu.devices]], "
                "or gpu.source = \"none\""
            ) from exc
        units = self._units()
        self._handles = [h for h, _ in units]
        self.gpus: Sequence[Gpu] = tuple(g for _, g in units)
        self.topology = self._topology()

    def _mig_units(self, index: int, handle: Any) -> list[tuple[Any, Gpu]]:
        nvml = self.nvml
        try:
            current, _ = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:  # no MIG on this GPU (most models)
            return []
        if current != 1:
            return []
        units = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError:  # an empty slot
                continue
            gpu = self._describe(index, mig)
            units.append((mig, Gpu(index, gpu.uuid, gpu.name, gpu.memory_mib, mig=True)))
        return units

    def _describe(self, index: int, handle: Any) -> Gpu:
        nvml = self.nvml
        name = nvml.nvmlDeviceGetName(handle)
        uuid = nvml.nvmlDeviceGetUUID(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return Gpu(index=index, uuid=_text(uuid), name=_text(name),
                   memory_mib=int(memory.total) // (1024 * 1024))

    def sample(self) -> dict[str, GpuSample]:
        """Readings of every GPU that answers. A GPU that NVML calls lost is noted in `lost`
        (the daemon marks it unhealthy). When NVML itself goes (every GPU fails, or the
        driver is gone: a driver upgrade), no GPU is blamed: readings stop, `available` is
        False, it is logged once, and NVML is tried again with backoff."""
        now = self.clock()
        if not self.available and (now < self.retry_at or not self._reinit(now)):
            return {}
        samples, failures = {}, {}
        for gpu, handle in zip(self.gpus, self._handles, strict=True):
            if gpu.mig:
                continue  # NVML has no readings of its own for a MIG device
            try:
                samples[gpu.uuid] = self._read(handle)
            except self.nvml.NVMLError as exc:  # one GPU off the bus must not stop the rest
                failures[gpu.uuid] = exc
                continue
            self.lost.pop(gpu.uuid, None)  # answers again (repaired): no longer lost
        if failures and (not samples or any(getattr(e, "value", None) in DRIVER_GONE
                                            for e in failures.values())):
            self._driver_lost(now, next(iter(failures.values())))
            return {}
        for uuid, error in failures.items():
            log.warning("gpu.sample_failed", gpu=uuid, error=str(error))
            verdict = lost_verdict(error)
            if verdict is not None:
                self.lost[uuid] = verdict
        return samples

    def _read(self, handle: Any) -> GpuSample:
        nvml = self.nvml
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        temp = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        return GpuSample(utilization_pct=int(util.gpu),
                         memory_used_mib=int(memory.used) // (1024 * 1024),
                         temperature_c=int(temp), processes=self._processes(handle))

    @property
    def available(self) -> bool:
        return self.readings.available

    def _driver_lost(self, now: float, error: Exception) -> None:
        if self.available:
            self.readings.since, self.readings.why = time.time(), str(error)
            log.warning("gpu.nvml_unavailable", error=str(error), message="NVML stopped "
                        "answering (a driver upgrade?): GPU readings unknown, replicas keep "
                        "running, NVML is tried again with backoff")
        self.readings.available, self.retry_s = False, RETRY_MIN_S
        self.retry_at = now + self.retry_s

    def _reinit(self, now: float) -> bool:
        nvml = self.nvml
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
        try:
            nvml.nvmlInit()
            handles = {g.uuid: h for h, g in self._units()}  # looked up afresh
            self._handles = [handles[g.uuid] for g in self.gpus]
        except (nvml.NVMLError, KeyError):
            self.retry_s = min(self.retry_s * 2, RETRY_MAX_S)
            self.retry_at = now + self.retry_s
            return False
        self.readings.available = True
        log.info("gpu.nvml_back", message="NVML answers again: GPU readings resume")
        return True

    def _units(self) -> list[tuple[Any, Gpu]]:
        """(handle, unit) of every allocatable unit: each whole GPU, or, for a GPU in MIG
        mode, each of its MIG devices."""
        found = []
        for i in range(self.nvml.nvmlDeviceGetCount()):
            handle = self.nvml.nvmlDeviceGetHandleByIndex(i)
            found += self._mig_units(i, handle) or [(handle, self._describe(i, handle))]
        return found

    def _topology(self) -> Topology:
        nvml, ranks = self.nvml, {}
        pairs = list(zip(self._handles, self.gpus, strict=True))
        for i, (ha, a) in enumerate(pairs):
            for hb, b in pairs[i + 1:]:
                try:
                    nvlink = nvml.nvmlDeviceGetP2PStatus(ha, hb, NVML_P2P_CAPS_INDEX_NVLINK) == 0
                    level = nvml.nvmlDeviceGetTopologyCommonAncestor(ha, hb)
                except nvml.NVMLError:  # unknown: the worst link is assumed
                    continue
                ranks[frozenset((a.uuid, b.uuid))] = NVLINK if nvlink else \
                    ANCESTOR_RANK.get(int(level), SYSTEM)
        return Topology(ranks)

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        try:
            running = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except self.nvml.NVMLError:
            return ()
        return tuple(GpuProcess(int(p.pid), int(p.usedGpuMemory or 0) // (1024 * 1024),
                                container_of_pid(int(p.pid))) for p in running)

    def handles(self) -> list[tuple[Any, str]]:
        """(NVML handle, uuid) of each GPU, for the health watch."""
        return [(h, g.uuid) for h, g in zip(self._handles, self.gpus, strict=True)]

    def close(self) -> None:
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()


def lost_verdict(error: Exception) -> str | None:
    """Why an NVML error means the GPU is gone ("GPU is lost", "unknown error"), else None."""
    value = getattr(error, "value", None)
    if value == 15:  # NVML_ERROR_GPU_IS_LOST
        return "NVML: GPU is lost"
    if value == 999:  # NVML_ERROR_UNKNOWN
        return "NVML: unknown error"
    return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def load_inventory(source: str, devices: Sequence[Any]) -> Inventory:
    """The inventory for `gpu.source`; GpuSourceError when it cannot be had."""
    if source == "static":
        return static_inventory(devices)
    if source == "none":
        return no_gpus()
    return NvmlInventory()
