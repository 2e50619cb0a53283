"""What berth reads from NVML, as one JSON-able record (scripts/gpu-probe prints it; the replay
NVML of the tests answers from such records)."""

from __future__ import annotations

import contextlib
from typing import Any

MIB = 1024 * 1024
EVENT_NAMES = {0x1: "single_bit_ecc", 0x2: "double_bit_ecc", 0x4: "pstate",
               0x8: "xid_critical", 0x10: "clock", 0x100: "mig_config_change"}
TOPOLOGY_NAMES = {0: "NVML_TOPOLOGY_INTERNAL", 10: "NVML_TOPOLOGY_SINGLE",
                  20: "NVML_TOPOLOGY_MULTIPLE", 30: "NVML_TOPOLOGY_HOSTBRIDGE",
                  40: "NVML_TOPOLOGY_NODE", 50: "NVML_TOPOLOGY_SYSTEM"}


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def probe(nvml: Any) -> dict[str, Any]:
    """The record of this machine's driver and devices (NVML initialised by the caller)."""
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    uuids = [text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
    return {"driver_version": text(nvml.nvmlSystemGetDriverVersion()),
            "nvml_version": text(nvml.nvmlSystemGetNVMLVersion()),
            "devices": [device(nvml, i, h, handles, uuids) for i, h in enumerate(handles)]}


def device(nvml: Any, index: int, handle: Any, handles: list[Any], uuids: list[str]
           ) -> dict[str, Any]:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    current, pending = nvml.nvmlDeviceGetMigMode(handle)
    mask = nvml.nvmlDeviceGetSupportedEventTypes(handle)
    topology, nvlink = {}, []
    for other_index, (other, uuid) in enumerate(zip(handles, uuids, strict=True)):
        if other_index != index:
            with contextlib.suppress(nvml.NVMLError):
                level = nvml.nvmlDeviceGetTopologyCommonAncestor(handle, other)
                topology[uuid] = TOPOLOGY_NAMES.get(level, str(level))
            with contextlib.suppress(nvml.NVMLError):
                if nvml.nvmlDeviceGetP2PStatus(handle, other, 3) == 0:  # NVLink P2P: OK
                    nvlink.append(uuid)
    return {
        "index": index, "uuid": uuids[index], "name": text(nvml.nvmlDeviceGetName(handle)),
        "memory_total_mib": int(memory.total) // MIB, "memory_used_mib": int(memory.used) // MIB,
        "utilization_pct": int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        "temperature_c": int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        "power_w": round(nvml.nvmlDeviceGetPowerUsage(handle) / 1000, 1),
        "mig_mode": {"current": int(current), "pending": int(pending)},
        "mig_devices": mig_devices(nvml, handle) if current == 1 else [],
        "topology": topology,
        "nvlink_peers": nvlink,
        "processes": [{"pid": int(p.pid), "used_memory_mib": int(p.usedGpuMemory or 0) // MIB}
                      for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)],
        "supported_events": [n for bit, n in EVENT_NAMES.items() if mask & bit],
    }


def mig_devices(nvml: Any, handle: Any) -> list[dict[str, Any]]:
    found = []
    for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nvml.NVMLError:
            continue
        found.append({"uuid": text(nvml.nvmlDeviceGetUUID(mig)),
                      "name": text(nvml.nvmlDeviceGetName(mig)),
                      "memory_total_mib": int(nvml.nvmlDeviceGetMemoryInfo(mig).total) // MIB})
    return found
