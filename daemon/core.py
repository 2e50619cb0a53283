"""berthd's core: GPU inventory, store, Docker runtime and reconciler, started in order on an
AsyncExitStack. Each part registers its own cleanup as soon as it has started, so a failed
start unwinds exactly what started, in reverse; closing the stack stops them the same way.

berthd (daemon/service.py) and the test harness build the core with this one function.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from berth.daemon.config import Config
from berth.gpu import GpuAllocator, GpuSourceError, Inventory, load_inventory
from berth.scheduler.probes import Prober
from berth.scheduler.reconciler import Reconciler
from berth.scheduler.runtime import DockerRuntime, DockerUnavailable
from berth.store import Store, StoreError

EXIT_CONFIG = 2
EXIT_STATE = 3
EXIT_DOCKER = 4


class StartupError(Exception):
    """berthd cannot start; `exit_code` tells systemd and scripts which part failed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Core:
    """The started parts every berthd has; none is optional."""

    inventory: Inventory
    store: Store
    allocator: GpuAllocator
    runtime: DockerRuntime
    reconciler: Reconciler


def gpu_mode(config: Config) -> str:
    """How GPUs reach containers: docker.gpu_mode, with "auto" decided by the GPU source."""
    mode = config.docker.gpu_mode
    if mode != "auto":
        return mode
    return "nvidia" if config.gpu.source == "nvml" else "env"


async def start_core(config: Config, stack: AsyncExitStack,
                     stop_replicas: Callable[[], bool]) -> Core:
    """Start the core on `stack`. `stop_replicas` is asked at shutdown whether replicas are
    stopped too (else left running for the next berthd to adopt)."""
    try:
        inventory = load_inventory(config.gpu.source, config.gpu.devices)
    except GpuSourceError as exc:
        raise StartupError(f"gpu.source: {exc}", EXIT_CONFIG) from exc
    stack.callback(inventory.close)
    try:
        store = await Store.open(config.daemon.state_dir)
    except StoreError as exc:
        raise StartupError(str(exc), EXIT_STATE) from exc
    stack.push_async_callback(store.close)  # last to close: every step before records events
    runtime = await _start_runtime(config, stack)
    prober = Prober()
    stack.push_async_callback(prober.close)
    allocator = GpuAllocator(inventory.gpus, store, config.gpu.reserve_mib,
                             inventory.topology)
    reconciler = Reconciler(store, allocator, runtime, prober, gpu_mode=gpu_mode(config))
    await reconciler.load()
    await reconciler.adopt()

    async def shutdown() -> None:
        await reconciler.shutdown(stop_replicas())
    stack.push_async_callback(shutdown)
    return Core(inventory, store, allocator, runtime, reconciler)


async def _start_runtime(config: Config, stack: AsyncExitStack) -> DockerRuntime:
    docker = config.docker
    runtime = DockerRuntime(docker.host, docker.network, docker.stop_timeout_s, docker.pull,
                            egress=docker.egress, subnet_pool=docker.subnet_pool)
    stack.push_async_callback(runtime.close)
    try:
        await runtime.connect()
    except DockerUnavailable as exc:
        raise StartupError(str(exc), EXIT_DOCKER) from exc
    refusal = cdi_refusal(gpu_mode(config), runtime.api_version, runtime.engine_version)
    if refusal is not None:
        raise StartupError(refusal, EXIT_CONFIG)
    return runtime


CDI_API = (1, 44)  # Docker 25: the first engine that takes CDI device requests


def cdi_refusal(mode: str, api_version: str, engine_version: str) -> str | None:
    """Why gpu_mode "cdi" cannot work with this engine (None when it can, or is not asked)."""
    if mode != "cdi":
        return None
    try:
        api = tuple(int(p) for p in api_version.split(".")[:2])
    except ValueError:
        return None  # an engine that does not say: let it answer for itself
    if api >= CDI_API:
        return None
    return (f"docker.gpu_mode: \"cdi\" needs Docker 25 or newer (API 1.44) with the NVIDIA "
            f"Container Toolkit's CDI spec; this engine is {engine_version} (API "
            f"{api_version}). Use gpu_mode = \"nvidia\" (the NVIDIA runtime) or upgrade Docker")
