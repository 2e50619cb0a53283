"""Test fixtures: a real Docker engine (reused, or started for the session), the demo model
image, and in-process berth parts wired to real SQLite files and real containers.

The helpers they build on (and that tests import) are in helpers.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from aiohttp import web

from berth.daemon.app import build_app
from berth.daemon.connections import ConnectionLimits, GuardedSite, header_deadline
from berth.gpu import Gpu
from helpers import (
    IMAGE,
    SESSION,
    TEST_LABEL,
    AdminApps,
    Harness,
    PrivateEngine,
    build_image,
    endpoint,
    engine,
    ready_count,
    static_gpus,
    wait_for,
)


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
        for c in client.containers.list(all=True, sparse=True, filters=filters):
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


@pytest.fixture
async def harness(tmp_path: Path, network: str, model_image: str
                  ) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Start harnesses (several over one state dir simulate berthd restarts); stops them all."""
    started: list[Harness] = []

    async def make(gpus: int | list[Gpu] = 0, state: str = "state", gpu_mode: str = "env",
                   egress: bool = True, host: str | None = None) -> Harness:
        devices = static_gpus(gpus) if isinstance(gpus, int) else gpus  # or the GPUs given
        h = Harness(tmp_path / state, network, devices, gpu_mode, egress, host)
        started.append(h)
        await h.start()
        return h

    yield make
    for h in reversed(started):
        await h.stop()


@pytest.fixture
async def api(harness: Callable[..., Awaitable[Harness]], aiohttp_client: Any,
              tmp_path: Path) -> AsyncIterator[AdminApps]:
    """Build the whole app with an admin token and a dispatcher: see helpers.AdminApps."""
    apps = AdminApps(harness, aiohttp_client, tmp_path / "tasks")
    yield apps
    await apps.close()


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


@pytest.fixture
async def front(harness) -> AsyncIterator[Callable[..., Awaitable[tuple[str, object]]]]:
    """berth's app behind the listener berthd uses, on a loopback port; endpoint "h" ready."""
    runners: list[web.AppRunner] = []

    async def make(replicas: int = 1, limits: ConnectionLimits | None = None,
                   body_timeout_s: float = 60.0, **fields: object) -> tuple[str, object]:
        h = await harness()
        await h.reconciler.apply_specs(
            {"h": endpoint("h", min_replicas=replicas, public=True, **fields)}, "config")
        pool = h.reconciler.pool("h")
        await wait_for(pool, lambda: ready_count(pool) == replicas, what="ready")
        app = build_app(h.reconciler, h.reconciler.allocator, body_timeout_s=body_timeout_s)
        app.middlewares.insert(0, header_deadline)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = GuardedSite(runner, "127.0.0.1", 0, limits or ConnectionLimits())
        await site.start()
        make.sites.append(site)  # type: ignore[attr-defined]
        make.apps.append(app)  # type: ignore[attr-defined]
        return f"127.0.0.1:{site.port}", pool

    make.sites = []  # type: ignore[attr-defined]  (the listeners, for tests that stop them)
    make.apps = []  # type: ignore[attr-defined]  (the apps, for tests that hand in tokens)
    yield make
    for runner in runners:
        await runner.cleanup()
