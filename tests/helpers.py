"""Shared test helpers (no fixtures: those are in conftest.py, which builds on these).

Test modules import these, and neither conftest nor one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import docker
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "demo") not in sys.path:
    sys.path.insert(0, str(ROOT / "demo"))

# demo/'s modules, importable once the line above ran; conftest takes them from here.
import build_image
import engine
from berth.daemon.config import EndpointSpec, parse_config
from berth.daemon.core import start_core
from berth.gpu.inventory import Gpu
from berth.scheduler.pool import EndpointPool
from berth.scheduler.reconciler import Reconciler

SESSION = uuid.uuid4().hex[:8]
TEST_LABEL = "berth.test"
IMAGE = build_image.DEFAULT_TAG


# --- endpoints and GPUs -----------------------------------------------------------------------

def endpoint(name: str, **fields: Any) -> EndpointSpec:
    """An endpoint on the test image with test-speed probes; fields override."""
    readiness = {"path": "/health", "period_s": 0.1, "timeout_s": 0.5}
    liveness = {"period_s": 0.1, "timeout_s": 0.5, "failure_threshold": 2}
    data: dict[str, Any] = {"name": name, "image": IMAGE, "startup_timeout_s": 20.0,
                            "readiness": readiness, "liveness": liveness,
                            "labels": {TEST_LABEL: SESSION}}
    data.update(fields)
    return EndpointSpec.model_validate(data)


def body(name: str, **fields: Any) -> dict[str, Any]:
    """endpoint() as the JSON body of a control API write."""
    data = endpoint(name, **fields).model_dump(mode="json")
    data["labels"] = {TEST_LABEL: SESSION}
    return data


def static_gpus(count: int, name: str = "Test GPU") -> list[Gpu]:
    return [Gpu(index=i, uuid=f"GPU-test-{i}", name=name, memory_mib=1024) for i in range(count)]


# --- in-process berth parts -------------------------------------------------------------------

class Harness:
    """berthd's core (start_core, as berthd builds it) over real SQLite and a real engine,
    with a fast reconcile timer of its own and no HTTP listener."""

    def __init__(self, state_dir: Path, network: str, gpus: list[Gpu],
                 gpu_mode: str = "env", egress: bool = True, host: str | None = None) -> None:
        # The second engine shares this host's routes: its networks take other addresses.
        pool = "10.210.0.0/16" if host is None else "10.214.0.0/16"
        self.network = network
        self.config = parse_config({
            "daemon": {"state_dir": str(state_dir)},
            "docker": {"host": host, "network": network, "stop_timeout_s": 1.0,
                       "egress": egress, "subnet_pool": pool, "gpu_mode": gpu_mode},
            "gpu": {"source": "static", "reserve_memory": "128m", "devices": [
                {"name": g.name, "memory_mib": g.memory_mib, "uuid": g.uuid, "mig": g.mig}
                for g in gpus]}})
        self._stack = AsyncExitStack()
        self._stop_replicas = True
        self._ticker: asyncio.Task[None] | None = None
        self.stopped = False

    async def start(self) -> Reconciler:
        try:
            core = await start_core(self.config, self._stack, lambda: self._stop_replicas)
        except BaseException:
            await self._stack.aclose()
            raise
        self.store, self.runtime, self.reconciler = core.store, core.runtime, core.reconciler
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return self.reconciler

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            await self.reconciler.run_pass()

    def pause_passes(self) -> None:
        """No more timed reconcile passes (a kick still runs one)."""
        if self._ticker is not None:
            self._ticker.cancel()

    async def stop(self, stop_replicas: bool = True) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self._ticker is not None:
            self._ticker.cancel()
        self._stop_replicas = stop_replicas
        await self._stack.aclose()


class SlowCreates:
    """The engine taking its time over container creates: each waits in the runtime's own
    thread (where a cancel cannot reach it) until `go_on` is set. `entered()`: one began."""

    def __init__(self, runtime: Any) -> None:
        self._create, self._entered, self.go_on = runtime._run, threading.Event(), \
            threading.Event()
        runtime._run = self._slow

    def _slow(self, spec: Any) -> Any:
        self._entered.set()
        self.go_on.wait(10)
        return self._create(spec)

    async def entered(self) -> bool:
        return await asyncio.to_thread(self._entered.wait, 10)


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


class CallsInFlight:
    """`callers` tasks calling GET `path` in a loop until the block ends; `statuses` holds every
    answer's status (the tests of rolls and moves assert that none was lost)."""

    def __init__(self, client: TestClient, path: str, callers: int = 2,
                 headers: dict[str, str] | None = None) -> None:
        self.client, self.path, self.headers = client, path, headers or {}
        self.statuses: list[int] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._call()) for _ in range(callers)]

    async def _call(self) -> None:
        while not self._stop.is_set():
            resp = await self.client.get(self.path, headers=self.headers)
            self.statuses.append(resp.status)

    async def __aenter__(self) -> CallsInFlight:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def containers(client: docker.DockerClient, **filters: str) -> list[Any]:
    """Containers (stopped too) matching `filters`, listed sparse: no per-container inspect, so
    a container berth removes meanwhile cannot turn the listing into a 404."""
    return client.containers.list(all=True, sparse=True, filters=filters)  # type: ignore[no-any-return]


def ready_count(pool: EndpointPool) -> int:
    return sum(1 for r in pool.replicas.values() if r.state.value == "ready")


class GuardedTestServer(TestServer):
    """aiohttp's TestServer listening as berthd does (GuardedSite, header deadline, handler
    cancellation), so that model calls go through berth's own front and the rest through
    aiohttp: `aiohttp_client(GuardedTestServer(app))`."""

    async def start_server(self, loop: asyncio.AbstractEventLoop | None = None,
                           **kwargs: Any) -> None:
        from berth.daemon.connections import ConnectionLimits, GuardedSite, header_deadline

        if self.runner:
            return
        if header_deadline not in self.app.middlewares:
            self.app.middlewares.insert(0, header_deadline)
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = GuardedSite(self.runner, self.host, 0, ConnectionLimits())
        await site.start()
        self.port, self.scheme = site.port, "http"
        self._root = URL(f"http://{self.host}:{self.port}")


class AdminApps:
    """The whole app as berthd serves it, over harnesses: admin token "admin-secret", a task
    dispatcher with its callback sender (callbacks to nowhere allowed), handler cancellation.

    Calling it starts a harness with `specs` as config-owned endpoints and returns it with a
    test client; `options` go to build_app. close() stops every dispatcher and sender made.
    """

    def __init__(self, harness: Callable[..., Awaitable[Harness]],
                 aiohttp_client: Callable[..., Awaitable[TestClient]], tasks: Path) -> None:
        self.harness = harness
        self.aiohttp_client = aiohttp_client
        self.tasks = tasks
        self.made: list[Any] = []  # (Dispatcher, CallbackSender) pairs

    async def __call__(self, specs: dict[str, EndpointSpec] | None = None,
                       gpus: int | list[Gpu] = 0,
                       files: Path | None = None, **options: Any) -> tuple[Harness, TestClient]:
        # Imported here: conftest loads this module for every test, the app's modules only
        # the tests that build an app need.
        from berth.daemon.app import build_app
        from berth.daemon.auth import Auth
        from berth.scheduler.callbacks import CallbackSender
        from berth.scheduler.dispatch import Dispatcher, DispatchSettings
        from berth.scheduler.egress import CallbackPolicy
        from berth.scheduler.router import Router

        h = await self.harness(gpus=gpus)
        assert h.store is not None and h.reconciler is not None
        await h.reconciler.apply_specs(specs or {}, "config")
        callbacks = CallbackSender(h.store, b"k", 1, 0.1, policy=CallbackPolicy([]))
        dispatcher = Dispatcher(h.store, Router(h.reconciler), files or self.tasks, callbacks,
                                DispatchSettings())
        await dispatcher.start()
        self.made.append((dispatcher, callbacks))
        auth = Auth(admin="admin-secret")
        await auth.load(h.store)
        app = build_app(h.reconciler, h.reconciler.allocator, dispatcher=dispatcher,
                        auth=auth, **options)
        client = await self.aiohttp_client(GuardedTestServer(app))
        return h, client

    async def close(self) -> None:
        for dispatcher, callbacks in self.made:
            await dispatcher.stop()
            await callbacks.close()


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


# --- a real berthd process --------------------------------------------------------------------

ENDPOINT = """
[endpoints.{name}]
image = "{image}"
min_replicas = {min_replicas}
gpus = {gpus}
env = {{ VERSION = "{version}" }}
startup_timeout_s = 20.0
readiness = {{ path = "/health", period_s = 0.1, timeout_s = 0.5 }}
liveness = {{ period_s = 0.2, timeout_s = 0.5 }}
labels = {{ "{label}" = "{session}" }}
"""


def config_text(state: Path, network: str, image: str, endpoints: dict[str, dict],
                extra: str = "") -> str:
    head = f"""
[daemon]
listen = "127.0.0.1:0"
state_dir = "{state}"
log_format = "json"
shutdown_grace_s = 2.0
reconcile_interval_s = 0.2
{extra}
[docker]
network = "{network}"
stop_timeout_s = 1.0
[gpu]
source = "static"
[[gpu.devices]]
name = "Test GPU"
memory_mib = 1024
[[gpu.devices]]
name = "Test GPU"
memory_mib = 1024
"""
    body = "".join(ENDPOINT.format(name=n, image=image, label=TEST_LABEL, session=SESSION,
                                   **{"min_replicas": 1, "gpus": 0, "version": "1", **e})
                   for n, e in endpoints.items())
    return head + body


class Berthd:
    """One berthd process with its own NOTIFY_SOCKET, read like systemd would."""

    def __init__(self, tmp: Path, config: Path, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.notify_path = tmp / f"notify-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.messages: list[str] = []
        self.port: int | None = None
        self.token: str | None = None  # sent when a call names none
        self.log = open(tmp / "berthd.log", "ab")  # noqa: SIM115
        self.stderr_path = tmp / f"stderr-{time.monotonic_ns()}"
        self.err = open(self.stderr_path, "wb")  # noqa: SIM115
        full_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "berth.daemon.main", "--config", str(config), *args],
            cwd=ROOT, env=full_env, stdout=self.log, stderr=self.err)

    def wait_message(self, wanted: str, timeout: float = 30.0) -> list[str]:
        """Block until a datagram containing `wanted` arrives; return its fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(data)
            fields = data.split("\n")
            for f in fields:
                if f.startswith("STATUS=serving on port "):
                    self.port = int(f.rsplit(" ", 1)[1])
            if wanted in fields:
                return fields
        raise AssertionError(f"no {wanted} from berthd; got {self.messages}; "
                             f"stderr: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict]:
        """A JSON call with the default token; (status, JSON answer)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path: str, token: str | None = None) -> tuple[int, dict]:
        status, body = self.get_bytes(path, token)
        return status, json.loads(body)

    def get_bytes(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        token = token or self.token
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def endpoint(self, name: str) -> dict:
        status, body = self.get(f"/v1/endpoints/{name}")
        assert status == 200, body
        return body

    def wait_endpoint(self, name: str, check: Callable[[dict], bool],
                      timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.get(f"/v1/endpoints/{name}")
            if status == 200 and check(body):
                return body
            time.sleep(0.05)
        raise AssertionError(f"endpoint {name} never matched; last: {body}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self.log.close()
        self.err.close()


def ready_ids(body: dict) -> list[str]:
    return [r["container_id"] for r in body["replicas"] if r["state"] == "ready"]


def one_ready(body: dict) -> bool:
    return len(ready_ids(body)) == 1 and len(body["replicas"]) == 1

