"""GPU inventory (NVML, static or none) and the allocator of whole GPUs to replicas."""

from berth.gpu.allocator import (
    GpuAllocator,
    GpuLedger,
    GpuMark,
    GpuMarkKind,
    choose_gpus,
    choose_shared_gpu,
)
from berth.gpu.inventory import Gpu, GpuSample, GpuSourceError, Inventory, load_inventory

__all__ = ["Gpu", "GpuAllocator", "GpuLedger", "GpuMark", "GpuMarkKind", "GpuSample",
           "GpuSourceError", "Inventory", "choose_gpus", "choose_shared_gpu",
           "load_inventory"]
