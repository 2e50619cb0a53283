"""Test fixtures: a real Docker engine (reused, or started for the session), the demo model
image, and in-process berth parts wired to real SQLite files and real containers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "demo"))

import build_image
import engine
from berth.daemon.config import EndpointSpec
from berth.gpu import GpuAllocator
from berth.gpu.inventory import Gpu
from berth.scheduler.pool import EndpointPool
from berth.scheduler.probes import Prober
from berth.scheduler.reconciler import Reconciler
from berth.scheduler.runtime import DockerRuntime
from berth.store import Store

SESSION = uuid.uuid4().hex[:8]
TEST_LABEL = "berth.test"
IMAGE = build_image.DEFAULT_TAG


@pytest.fixture(scope="session")
def docker_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A reachable engine: DOCKER_HOST or the default socket, else a private dockerd.

    Fails (never skips) when no engine can be had: these tests are about the Docker path.
    """
    host = engine.existing_engine()
    proc = None
    if host is None:
        base = Path(f"/tmp/berth-test-docker-{SESSION}")
        try:
            host, proc = engine.start_dockerd(base)
        except RuntimeError as exc:
            pytest.fail(f"Docker engine needed and none could be had: {exc}", pytrace=False)
    old = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = host
    yield host
    _remove_test_containers(host)
    if old is None:
        os.environ.pop("DOCKER_HOST", None)
    else:
        os.environ["DOCKER_HOST"] = old
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(f"/tmp/berth-test-docker-{SESSION}", ignore_errors=True)


def _remove_test_containers(host: str) -> None:
    client = docker.DockerClient(base_url=host, version="auto")
    network = f"berth-test-{SESSION}"
    for filters in ({"label": f"{TEST_LABEL}={SESSION}"}, {"network": network},
                    {"label": f"berth.instance={network}"}):
        for c in client.containers.list(all=True, filters=filters):
            c.remove(force=True)
    for n in [*client.networks.list(names=[network]),
              *client.networks.list(filters={"label": f"berth.instance={network}"})]:
        with contextlib.suppress(docker.errors.NotFound):
            n.remove()
    client.close()


@pytest.fixture(scope="session")
def docker_client(docker_host: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=docker_host, version="auto")
    yield client
    client.close()


@pytest.fixture(scope="session")
def model_image(docker_client: docker.DockerClient) -> str:
    build_image.ensure_image(docker_client, IMAGE)
    return IMAGE


@pytest.fixture
def network() -> str:
    return f"berth-test-{SESSION}"


def endpoint(name: str, **fields: Any) -> EndpointSpec:
    """An endpoint on the test image with test-speed probes; fields override."""
    readiness = {"path": "/health", "period_s": 0.1, "timeout_s": 0.5}
    liveness = {"period_s": 0.1, "timeout_s": 0.5, "failure_threshold": 2}
    data: dict[str, Any] = {"name": name, "image": IMAGE, "startup_timeout_s": 20.0,
                            "readiness": readiness, "liveness": liveness,
                            "labels": {TEST_LABEL: SESSION}}
    data.update(fields)
    return EndpointSpec.model_validate(data)


def static_gpus(count: int, name: str = "Test GPU") -> list[Gpu]:
    return [Gpu(index=i, uuid=f"GPU-test-{i}", name=name, memory_mib=1024) for i in range(count)]


class Harness:
    """A reconciler over real SQLite and a real engine, with a fast timer of its own."""

    def __init__(self, state_dir: Path, network: str, gpus: list[Gpu],
                 gpu_mode: str = "env", egress: bool = True, host: str | None = None) -> None:
        self.egress = egress
        self.host = host  # None: DOCKER_HOST, the session's engine
        self.gpu_mode = gpu_mode
        self.state_dir = state_dir
        self.network = network
        self.gpus = gpus
        self.store: Store | None = None
        self.runtime: DockerRuntime | None = None
        self.reconciler: Reconciler | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.stopped = False

    async def start(self) -> Reconciler:
        self.store = await Store.open(self.state_dir)
        allocator = GpuAllocator(self.gpus, self.store)
        # The second engine shares this host's routes: its networks take other addresses.
        pool = "10.210.0.0/16" if self.host is None else "10.214.0.0/16"
        self.runtime = DockerRuntime(self.host, self.network, stop_timeout_s=1,
                                     egress=self.egress, subnet_pool=pool)
        await self.runtime.connect()
        self.reconciler = Reconciler(self.store, allocator, self.runtime, Prober(),
                                     self.gpu_mode)
        await self.reconciler.load()
        await self.reconciler.adopt()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return self.reconciler

    async def _tick(self) -> None:
        assert self.reconciler is not None
        while True:
            await asyncio.sleep(0.1)
            await self.reconciler.run_pass()

    async def stop(self, stop_replicas: bool = True) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self._ticker is not None:
            self._ticker.cancel()
        if self.reconciler is not None:
            await self.reconciler.shutdown(stop_replicas)
            await self.reconciler.prober.close()
        if self.runtime is not None:
            await self.runtime.close()
        if self.store is not None:
            await self.store.close()


@pytest.fixture
async def harness(tmp_path: Path, network: str, model_image: str
                  ) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Start harnesses (several over one state dir simulate berthd restarts); stops them all."""
    started: list[Harness] = []

    async def make(gpus: int = 0, state: str = "state", gpu_mode: str = "env",
                   egress: bool = True, host: str | None = None) -> Harness:
        h = Harness(tmp_path / state, network, static_gpus(gpus), gpu_mode, egress, host)
        started.append(h)
        await h.start()
        return h

    yield make
    for h in reversed(started):
        await h.stop()


async def wait_for(pool: EndpointPool, predicate: Callable[[], bool], timeout: float = 15.0,
                   what: str = "condition") -> None:
    """Wait until `predicate` holds, woken by the pool's ready/failed/stopped notifications."""
    async def waiter() -> None:
        while not predicate():
            async with pool.changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pool.changed.wait(), 0.2)
    try:
        await asyncio.wait_for(waiter(), timeout)
    except TimeoutError:
        states = {r.id: r.state.value for r in pool.replicas.values()}
        raise AssertionError(f"timed out waiting for {what}; replicas: {states}, "
                             f"error: {pool.error}") from None


def ready_count(pool: EndpointPool) -> int:
    return sum(1 for r in pool.replicas.values() if r.state.value == "ready")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Make tmpfs mounts of a given size (a disk that fills up for real); unmounts them."""
    mounts: list[Path] = []

    def make(size: str) -> Path:
        path = tmp_path / f"disk-{len(mounts)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], check=True)
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


class PrivateEngine:
    """A second dockerd of the tests' own, with Docker's default iptables rules (which isolate
    bridge networks), no default bridge and addresses apart from the first engine's. Tests
    may stop and start it: its data root keeps the model image across restarts."""

    FLAGS = ("--bridge=none", "--default-address-pool=base=10.213.0.0/16,size=24",
             "--shutdown-timeout=1")

    def __init__(self, base: Path) -> None:
        self.base = base
        self.host = f"unix://{base}/docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        try:
            self.host, self.proc = engine.start_dockerd(self.base, extra=self.FLAGS)
        except RuntimeError as exc:
            pytest.fail(f"a second Docker engine is needed and could not start: {exc}",
                        pytrace=False)

    def stop(self) -> None:
        """Stop dockerd as `systemctl stop docker` does (SIGTERM, containers stopped)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
            self.proc = None

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, version="auto")


@pytest.fixture(scope="session")
def private_engine(docker_client: docker.DockerClient, model_image: str
                   ) -> Iterator[PrivateEngine]:
    """The second engine, with the demo model image loaded from the first."""
    private = PrivateEngine(Path(f"/tmp/berth-test-docker2-{SESSION}"))
    private.start()
    client = private.client()
    client.images.load(b"".join(docker_client.images.get(model_image).save(named=True)))
    client.close()
    yield private
    if private.proc is None:
        private.start()
    _remove_test_containers(private.host)
    private.stop()
    shutil.rmtree(private.base, ignore_errors=True)
