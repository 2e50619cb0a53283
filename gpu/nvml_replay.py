"""A replay of the few NVML calls berth makes, answered from a probe record.

`scripts/gpu-probe` writes what berth reads from NVML as JSON; this module answers the same
pynvml functions from such a file, so the inventory, the sampler and the health watch run in
tests exactly as against a driver. A record may carry `events` (Xid and ECC events in order,
as NVML's event set would deliver them) and a device may be `lost` after its events: from then
on its calls raise NVMLError_GpuIsLost, as a GPU that fell off the bus does.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

NVML_TEMPERATURE_GPU = 0
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
nvmlEventTypeSingleBitEccError = 0x1
nvmlEventTypeDoubleBitEccError = 0x2
nvmlEventTypeXidCriticalError = 0x8
EVENT_TYPES = {"single_bit_ecc": 0x1, "double_bit_ecc": 0x2, "pstate": 0x4,
               "xid_critical": 0x8, "clock": 0x10, "mig_config_change": 0x100}
TOPOLOGY = {"NVML_TOPOLOGY_INTERNAL": 0, "NVML_TOPOLOGY_SINGLE": 10,
            "NVML_TOPOLOGY_MULTIPLE": 20, "NVML_TOPOLOGY_HOSTBRIDGE": 30,
            "NVML_TOPOLOGY_NODE": 40, "NVML_TOPOLOGY_SYSTEM": 50}
MIB = 1024 * 1024


class NVMLError(Exception):
    """As pynvml's: `value` is the NVML return code."""

    def __init__(self, value: int) -> None:
        super().__init__({NVML_ERROR_TIMEOUT: "Timeout", NVML_ERROR_GPU_IS_LOST: "GPU is lost",
                          NVML_ERROR_UNKNOWN: "Unknown Error"}.get(value, f"NVML error {value}"))
        self.value = value


class NVMLError_Timeout(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_TIMEOUT)


class NVMLError_GpuIsLost(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_GPU_IS_LOST)


class ReplayNvml:
    """The pynvml module, as far as berth uses it, over one probe record."""

    NVMLError = NVMLError
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN
    nvmlEventTypeSingleBitEccError = nvmlEventTypeSingleBitEccError
    nvmlEventTypeDoubleBitEccError = nvmlEventTypeDoubleBitEccError
    nvmlEventTypeXidCriticalError = nvmlEventTypeXidCriticalError

    def __init__(self, record: dict[str, Any]) -> None:
        self.generation = 0  # nvmlInit calls so far
        self.record = record
        self.devices: list[dict[str, Any]] = record["devices"]
        self.events: deque[dict[str, Any]] = deque(record.get("events", []))
        self.lost: set[int] = set()
        self.gone = False
        self.arrived = threading.Event()  # set by push(): a waiting event set wakes

    @classmethod
    def load(cls, path: str | Path) -> ReplayNvml:
        return cls(json.loads(Path(path).read_text()))

    def push(self, event: dict[str, Any]) -> None:
        """A new event, as the driver would raise it now (tests inject Xids this way)."""
        self.events.append(event)
        self.arrived.set()

    def driver_gone(self, gone: bool = True) -> None:
        """As during a driver upgrade: every call fails (9: driver not loaded) until back."""
        self.gone = gone

    def _device(self, handle: Any) -> dict[str, Any]:
        if self.gone:
            raise NVMLError(9)
        if isinstance(handle, tuple):  # ("mig", GPU index, slot): a MIG device
            mig: dict[str, Any] = self._device(handle[1])["mig_devices"][handle[2]]
            return mig
        if handle in self.lost:
            raise NVMLError_GpuIsLost()
        device: dict[str, Any] = self.devices[handle]
        return device

    def _field(self, handle: Any, key: str) -> Any:
        """A reading the record has for this device; NOT_SUPPORTED (3) where it has none (as
        NVML answers for most readings of a MIG device)."""
        device = self._device(handle)
        if key not in device:
            raise NVMLError(3)
        return device[key]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: int) -> int:
        return len(self._device(handle).get("mig_devices", []))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: int, slot: int) -> tuple[str, int, int]:
        if slot >= len(self._device(handle).get("mig_devices", [])):
            raise NVMLError(6)  # NVML_ERROR_NOT_FOUND
        return ("mig", handle, slot)

    # --- system ---------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.gone:
            raise NVMLError(9)
        self.generation += 1  # as a real re-init: event sets made before no longer work

    def nvmlShutdown(self) -> None:
        return None

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self.record["driver_version"])

    def nvmlSystemGetNVMLVersion(self) -> str:
        return str(self.record["nvml_version"])

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    # --- one device -------------------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return str(self._device(handle)["name"])

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return str(self._device(handle)["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> SimpleNamespace:
        d = self._device(handle)
        total, used = d["memory_total_mib"] * MIB, d.get("memory_used_mib", 0) * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._field(handle, "utilization_pct"), memory=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return int(self._field(handle, "temperature_c"))

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return int(self._field(handle, "power_w") * 1000)

    def nvmlDeviceGetMigMode(self, handle: int) -> tuple[int, int]:
        mode = self._field(handle, "mig_mode")
        return int(mode["current"]), int(mode["pending"])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p["pid"], usedGpuMemory=p["used_memory_mib"] * MIB)
                for p in self._field(handle, "processes")]

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        return TOPOLOGY[self._field(a, "topology")[self._device(b)["uuid"]]]

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, caps_index: int) -> int:
        """0 (NVML_P2P_STATUS_OK) when `b` is among `a`'s NVLink peers; 5 (not supported)."""
        return 0 if self._device(b)["uuid"] in self._device(a).get("nvlink_peers", []) else 5

    def nvmlDeviceGetSupportedEventTypes(self, handle: int) -> int:
        mask = 0
        for name in self._field(handle, "supported_events"):
            mask |= EVENT_TYPES[name]
        return mask

    # --- events -----------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> dict[str, int]:
        if self.gone:
            raise NVMLError(9)
        return {"_generation": self.generation}

    def nvmlDeviceRegisterEvents(self, handle: int, types: int,
                                 event_set: dict[str, int]) -> None:
        self._device(handle)
        event_set[str(handle)] = types

    def nvmlEventSetWait(self, event_set: dict[str, int],
                         timeout_ms: int) -> SimpleNamespace:
        if self.gone:
            raise NVMLError(9)
        if event_set.get("_generation") != self.generation:
            raise NVMLError(1)  # NVML_ERROR_UNINITIALIZED: a set from before a re-init
        if not self.events:
            self.arrived.clear()
            self.arrived.wait(timeout_ms / 1000)
        if not self.events:
            raise NVMLError_Timeout()
        event = self.events.popleft()
        index = int(event["device"])
        if event.get("then_lost"):
            self.lost.add(index)
        return SimpleNamespace(device=index, eventType=EVENT_TYPES[event["type"]],
                               eventData=int(event.get("xid", 0)), gpuInstanceId=0,
                               computeInstanceId=0)

    def nvmlEventSetFree(self, event_set: dict[str, int]) -> None:
        return None
