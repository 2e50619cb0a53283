"""GPU inventory sources. NVML itself is exercised where a GPU machine is at hand (README)."""

from __future__ import annotations

import re

import pytest

from berth.daemon.config import GpuDevice
from berth.gpu import GpuSourceError, load_inventory


def test_static_inventory_from_declared_devices():
    inv = load_inventory("static", [GpuDevice(name="NVIDIA H100", memory_mib=81559),
                                    GpuDevice(name="NVIDIA H100", memory_mib=81559,
                                              uuid="GPU-abc")])
    assert [(g.index, g.uuid, g.name, g.memory_mib) for g in inv.gpus] == [
        (0, "static-0", "NVIDIA H100", 81559), (1, "GPU-abc", "NVIDIA H100", 81559)]
    assert inv.sample() == {} and inv.source == "static"


def test_none_inventory_has_no_gpus():
    inv = load_inventory("none", [])
    assert list(inv.gpus) == [] and inv.source == "none"


def test_nvml_inventory(request):
    """Without NVML: a clear error naming `static`. With NVML: real GPUs with live samples."""
    import pynvml
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        present = True
    except pynvml.NVMLError:
        present = False
    if not present:
        with pytest.raises(GpuSourceError, match=re.escape('gpu.source = "static"')):
            load_inventory("nvml", [])
        return
    inv = load_inventory("nvml", [])
    assert inv.gpus, "NVML answered but reported no GPU"
    for gpu in inv.gpus:
        assert gpu.uuid.startswith("GPU-") and gpu.memory_mib > 0 and gpu.name
    samples = inv.sample()
    assert set(samples) == {g.uuid for g in inv.gpus}
    for sample in samples.values():
        assert 0 <= sample.utilization_pct <= 100 and sample.memory_used_mib >= 0
        assert 0 < sample.temperature_c < 120
    inv.close()
