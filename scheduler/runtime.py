"""Docker runtime: the only code in berth that calls the Docker SDK.

The SDK blocks, so every call runs in a small dedicated thread pool, never on the event loop.
Each endpoint's replicas run on a bridge network of their own ("<network>-<endpoint>"), so
replicas of different endpoints cannot reach each other; berthd reaches them at their address
on it from the host, and no port is published. Replicas run with no-new-privileges, every
capability dropped but the endpoint's cap_add, and a pids limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import docker.utils
import structlog

log = structlog.get_logger("berth.runtime")
T = TypeVar("T")

LABEL_MANAGED = "berth.managed"
LABEL_ENDPOINT = "berth.endpoint"
LABEL_REPLICA = "berth.replica"
LABEL_GENERATION = "berth.generation"
LABEL_INSTANCE = "berth.instance"  # the network name: berthds on other networks are left alone
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
SUBNET_PREFIX = 24  # one endpoint's network: 253 replicas


class DockerUnavailable(Exception):
    """No Docker engine answers at the configured address."""


class ContainerNotRemoved(Exception):
    """The engine answered but did not remove the container: it may still run (and hold its
    GPUs), so whoever asked keeps the replica's GPUs and tries again later."""


class ImageUnavailable(Exception):
    """The image is not on the engine and cannot be pulled."""


class ContainerStartError(Exception):
    """The engine refused to create or start the container; the message says why."""


@dataclass(frozen=True)
class ContainerSpec:
    """Everything the engine needs to run one replica."""

    name: str
    image: str
    labels: dict[str, str]
    env: dict[str, str]
    port: int
    command: list[str] | None = None
    args: list[str] | None = None
    volumes: list[str] = field(default_factory=list)
    shm_size: str | None = None
    cpus: float | None = None
    memory: str | None = None
    gpu_uuids: list[str] = field(default_factory=list)
    gpu_mode: str = "env"  # env | nvidia | cdi
    network: str | None = None  # the endpoint's network; None: the runtime's own
    pids_limit: int = 4096
    cap_add: list[str] = field(default_factory=list)
    user: str | None = None  # None: the image's user
    cache: tuple[str, str] | None = None  # (volume, path inside): the endpoint's cache


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    labels: dict[str, str]
    running: bool
    status: str  # the engine's words, e.g. "Exited (3) 2 seconds ago"
    ip: str | None
    create_s: float = 0.0  # how long creating and starting took, when this call did them
    start_s: float = 0.0

    @property
    def replica(self) -> str | None:
        return self.labels.get(LABEL_REPLICA)


def gpu_env(uuids: Sequence[str], indexes: Sequence[int], gpu_mode: str) -> dict[str, str]:
    """CUDA_/NVIDIA_VISIBLE_DEVICES for a replica's GPUs.

    With a device request the container sees only its GPUs, numbered from 0; with env only
    (static GPUs) CUDA_VISIBLE_DEVICES names the host indexes.
    """
    if not uuids:
        return {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}
    if any(u.startswith("MIG-") for u in uuids):  # CUDA names a MIG device by its uuid only
        return {"CUDA_VISIBLE_DEVICES": ",".join(uuids), "NVIDIA_VISIBLE_DEVICES": ",".join(uuids)}
    cuda = range(len(uuids)) if gpu_mode in ("nvidia", "cdi") else indexes
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in cuda),
            "NVIDIA_VISIBLE_DEVICES": ",".join(uuids)}


def create_kwargs(spec: ContainerSpec, network: str) -> dict[str, Any]:
    """Arguments for `containers.create`: pure, so the mapping is tested without an engine."""
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "name": spec.name,
        "labels": {**spec.labels, LABEL_INSTANCE: network},
        "environment": spec.env,
        "network": spec.network or network,
        "detach": True,
        "volumes": [*spec.volumes, *([f"{spec.cache[0]}:{spec.cache[1]}"] if spec.cache else [])],
        # Least privilege: a model server needs no capability, setuid or fork bomb.
        "security_opt": ["no-new-privileges:true"],
        "cap_drop": ["ALL"],
        "pids_limit": spec.pids_limit,
    }
    if spec.cap_add:
        kwargs["cap_add"] = list(spec.cap_add)
    if spec.user is not None:
        kwargs["user"] = spec.user
    if spec.command is not None:
        kwargs["entrypoint"] = spec.command
    if spec.args is not None:
        kwargs["command"] = spec.args
    if spec.shm_size:
        kwargs["shm_size"] = spec.shm_size
    if spec.memory:
        kwargs["mem_limit"] = spec.memory
    if spec.cpus:
        kwargs["nano_cpus"] = int(spec.cpus * 1e9)
    if spec.gpu_uuids and spec.gpu_mode == "nvidia":
        kwargs["device_requests"] = [docker.types.DeviceRequest(
            driver="nvidia", device_ids=list(spec.gpu_uuids), capabilities=[["gpu"]])]
    elif spec.gpu_uuids and spec.gpu_mode == "cdi":
        kwargs["device_requests"] = [docker.types.DeviceRequest(
            driver="cdi", device_ids=[f"nvidia.com/gpu={u}" for u in spec.gpu_uuids])]
    return kwargs


def free_subnet(pool: ipaddress.IPv4Network,
                in_use: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
                ) -> ipaddress.IPv4Network | None:
    """The first /24 of `pool` that overlaps no network of the engine (Docker's own pools
    hold about 30 networks; one per endpoint needs more)."""
    taken = [n for n in in_use if isinstance(n, ipaddress.IPv4Network)]
    for candidate in pool.subnets(new_prefix=SUBNET_PREFIX):
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    return None


def host_routes(table: str = "/proc/net/route") -> list[ipaddress.IPv4Network]:
    """The IPv4 networks this host routes to directly or through a gateway (not the default
    route), from the kernel's table; none where it cannot be read."""
    routes = []
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        with contextlib.suppress(ValueError):
            dest = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
            mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
            network = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
            if network.prefixlen > 0:
                routes.append(network)
    return routes


def _short(exc: BaseException) -> str:
    """An SDK error in one line: the innermost OS error's words when there is one (requests
    nests them several reprs deep), else the first line of the message."""
    inner: BaseException | None = exc
    for _ in range(6):
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror
        if inner is None:
            break
        nested = [a for a in inner.args if isinstance(a, BaseException)]
        inner = nested[0] if nested else inner.__cause__ or inner.__context__
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def first_address(networks: dict[str, Any]) -> str | None:
    """A replica's address: it is on one network only, its endpoint's."""
    for settings in networks.values():
        if (settings or {}).get("IPAddress"):
            return str(settings["IPAddress"])
    return None


class DockerRuntime:
    """Containers of replicas on one engine. Every public method is a coroutine."""

    def __init__(self, host: str | None, network: str, stop_timeout_s: float = 10.0,
                 pull: bool = True, workers: int = 4, egress: bool = True,
                 subnet_pool: str = "10.210.0.0/16") -> None:
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
        self.network = network
        self.egress = egress  # False: endpoint networks are internal (no route out)
        self._networks: set[str] = set()  # endpoint networks known to exist
        self._network_lock = threading.Lock()
        self.subnet_pool = ipaddress.IPv4Network(subnet_pool)
        self.down_since: float | None = None  # when the engine stopped answering, if it has
        self.down_reason = ""
        self.stop_timeout_s = stop_timeout_s
        self.pull = pull
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker")
        self._client: docker.DockerClient | None = None
        self.runtimes: set[str] = set()
        self.engine_version = self.api_version = "unknown"  # learnt by connect()

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking SDK call in the pool. A call that cannot reach the engine raises
        DockerUnavailable (and marks an outage); an answer of the engine ends one."""
        loop, started = asyncio.get_running_loop(), time.time()
        try:
            result = await loop.run_in_executor(self._pool, functools.partial(fn, *args,
                                                                              **kwargs))
        except docker.errors.APIError:
            self._engine_answered(started)
            raise
        except (docker.errors.DockerException, OSError) as exc:  # requests' errors are OSErrors
            self._engine_lost(exc)
            raise DockerUnavailable(f"Docker engine at {self.host} is unreachable: "
                                    f"{_short(exc)}") from exc
        self._engine_answered(started)
        return result

    @property
    def engine_up(self) -> bool:
        return self.down_since is None

    def _engine_lost(self, exc: BaseException) -> None:
        if self.down_since is None:  # said once per outage, not at every failed call
            self._networks.clear()  # the engine may come back without them
            # Pooled connections may still reach an engine that is shutting down (its socket
            # is gone, old connections are served): drop them, so "back" means back.
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.api.close()
            self.down_since = time.time()
            self.down_reason = _short(exc)
            log.warning("docker.unreachable", host=self.host, error=self.down_reason,
                        message=f"Docker engine at {self.host} is unreachable")

    def _engine_answered(self, asked_at: float) -> None:
        # Only a call made after the outage began proves the engine is back: one that was
        # under way before may finish after the engine went away.
        if self.down_since is not None and asked_at > self.down_since:
            log.warning("docker.reachable", host=self.host,
                        down_s=round(time.time() - self.down_since, 1),
                        message=f"Docker engine at {self.host} answers again")
            self.down_since = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise DockerUnavailable("runtime not connected")
        return self._client

    async def connect(self) -> None:
        """Reach the engine, learn its runtimes, and make sure berth's network exists."""
        try:
            self._client = await self._call(
                docker.DockerClient, base_url=self.host, version="auto", timeout=60)
            info = await self._call(self.client.info)
        except (DockerUnavailable, docker.errors.DockerException, OSError) as exc:
            cause = exc.__cause__ if isinstance(exc, DockerUnavailable) else exc
            raise DockerUnavailable(f"no Docker engine answers at {self.host}: "
                                    f"{_short(cause or exc)}") from exc
        self.runtimes = set(info.get("Runtimes", {}))
        self.engine_version = str(info.get("ServerVersion", "unknown"))
        self.api_version = str(self.client.api.api_version)
        await self._call(self._ensure_network)

    def _ensure_network(self, name: str | None = None, internal: bool = False) -> None:
        """Create the network once (under a lock: two replicas starting together must not
        make two networks of one name), on the first free /24 of docker.subnet_pool."""
        name = name or self.network
        with self._network_lock:
            if name in self._networks:
                return
            if not self._networks_named(name):
                subnet = free_subnet(self.subnet_pool, self._subnets_in_use())
                if subnet is None:
                    raise ContainerStartError(f"no free /{SUBNET_PREFIX} left in "
                                              f"docker.subnet_pool {self.subnet_pool}")
                ipam = docker.types.IPAMConfig(pool_configs=[
                    docker.types.IPAMPool(subnet=str(subnet))])
                self.client.networks.create(name, driver="bridge", internal=internal,
                                            ipam=ipam, labels={LABEL_MANAGED: "true",
                                                               LABEL_INSTANCE: self.network})
            self._networks.add(name)

    def _networks_named(self, name: str) -> list[Any]:
        # The engine's name filter matches substrings: "berth-e" would find "berth-echo".
        return [n for n in self.client.networks.list(names=[name]) if n.name == name]

    def _subnets_in_use(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The engine's networks and the host's routes (another engine, a VPN, a stale
        bridge): a network overlapping any of them would be unreachable from berthd."""
        found: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = list(host_routes())
        for network in self.client.api.networks():
            for config in (network.get("IPAM") or {}).get("Config") or []:
                with contextlib.suppress(ValueError, TypeError):
                    found.append(ipaddress.ip_network(config.get("Subnet"), strict=False))
        return found

    def endpoint_network(self, endpoint: str) -> str:
        """The network an endpoint's replicas share, and no other endpoint's."""
        return f"{self.network}-{endpoint}"

    def cache_volume(self, endpoint: str) -> str:
        """The endpoint's cache volume: berth-cache-<endpoint> (another instance's network
        name in place of "berth", so two berths on one engine never share one)."""
        return f"{self.network}-cache-{endpoint}"

    async def volume_size(self, name: str) -> int | None:
        """Bytes in a volume (the engine counts them; None if it has no such volume)."""
        def size() -> int | None:
            for volume in self.client.df().get("Volumes") or []:
                if volume.get("Name") == name:
                    usage = (volume.get("UsageData") or {}).get("Size")
                    return int(usage) if usage is not None and usage >= 0 else None
            return None
        return await self._call(size)

    async def remove_volume(self, name: str) -> None:
        """Delete a volume (gone already is fine; one still in use stays, said in the log)."""
        def remove() -> None:
            try:
                self.client.api.remove_volume(name)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                log.warning("volume.not_removed", volume=name, error=str(exc))
        await self._call(remove)

    def _ensure_volume(self, name: str, endpoint: str) -> None:
        try:
            self.client.volumes.get(name)
        except docker.errors.NotFound:
            self.client.volumes.create(name, labels={LABEL_MANAGED: "true",
                                                     LABEL_INSTANCE: self.network,
                                                     LABEL_ENDPOINT: endpoint})

    async def remove_network(self, name: str) -> None:
        """Remove an endpoint's network once its replicas are gone (gone already is fine)."""
        def remove() -> None:
            self._networks.discard(name)
            for network in self._networks_named(name):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    network.remove()
        await self._call(remove)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await self._call(client.close)
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def ensure_image(self, image: str,
                           layers: Callable[[str, str], None] | None = None) -> None:
        """Make sure the image is on the engine, pulling it (progress in the log) if allowed.
        `layers(layer, status)` hears each layer's progress (from the pull's thread)."""
        await self._call(self._ensure_image, image, layers)

    def _ensure_image(self, image: str,
                      layers: Callable[[str, str], None] | None = None) -> None:
        try:
            self.client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as exc:
            raise ImageUnavailable(f"image {image}: {exc.explanation or exc}") from exc
        if not self.pull:
            raise ImageUnavailable(f"image {image} is not on the engine and docker.pull is off")
        repo, tag = docker.utils.parse_repository_tag(image)
        log.info("image.pulling", image=image, message=f"pulling image {image}")
        try:
            last = ""
            for line in self.client.api.pull(repo, tag or "latest", stream=True, decode=True):
                if "error" in line:
                    raise ImageUnavailable(f"image {image} cannot be pulled: {line['error']}")
                status = f"{line.get('id', '')} {line.get('status', '')}".strip()
                if layers is not None and line.get("id") and line.get("status"):
                    layers(str(line["id"]), str(line["status"]))
                if status != last:  # layer progress ticks would flood the log
                    log.info("image.pull_progress", image=image, status=status)
                    last = status
        except docker.errors.APIError as exc:
            raise ImageUnavailable(
                f"image {image} is not on the engine and cannot be pulled: "
                f"{exc.explanation or exc}") from exc

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start the container; ContainerStartError if the engine refuses."""
        return await self._call(self._run, spec)

    def _run(self, spec: ContainerSpec) -> ContainerInfo:
        container, began = None, time.monotonic()
        try:
            self._ensure_network(spec.network, internal=not self.egress)
            if spec.cache is not None:
                self._ensure_volume(spec.cache[0], spec.labels.get(LABEL_ENDPOINT, ""))
            try:
                container = self.client.containers.create(**create_kwargs(spec, self.network))
            except docker.errors.NotFound as exc:
                if "network" not in str(exc):
                    raise
                self._networks.discard(spec.network or self.network)  # removed behind us
                self._ensure_network(spec.network, internal=not self.egress)
                container = self.client.containers.create(**create_kwargs(spec, self.network))
            created = time.monotonic()
            container.start()
            container.reload()
        except docker.errors.APIError as exc:
            if container is not None:  # never leave a created-but-dead container behind
                self._remove_quietly(container.id)
            raise ContainerStartError(f"{exc.explanation or exc}") from exc
        return replace(self._info(container.attrs), create_s=created - began,
                                   start_s=time.monotonic() - created)

    def _info(self, attrs: dict[str, Any]) -> ContainerInfo:
        networks = attrs.get("NetworkSettings", {}).get("Networks", {}) or {}
        ip = first_address(networks)
        state = attrs.get("State", {})
        return ContainerInfo(
            id=attrs["Id"], name=attrs.get("Name", "").lstrip("/"),
            labels=attrs.get("Config", {}).get("Labels") or {},
            running=bool(state.get("Running")),
            status=state.get("Status", ""), ip=ip)

    async def list_managed(self) -> list[ContainerInfo]:
        """Every container of this berth instance, running or not (one cheap engine call)."""
        labels = [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.network}"]
        rows = await self._call(self.client.api.containers, all=True, filters={"label": labels})
        result = []
        for row in rows:
            networks = (row.get("NetworkSettings") or {}).get("Networks") or {}
            ip = first_address(networks)
            names = row.get("Names") or [""]
            result.append(ContainerInfo(
                id=row["Id"], name=names[0].lstrip("/"), labels=row.get("Labels") or {},
                running=row.get("State") == "running", status=row.get("Status", ""), ip=ip))
        return result

    async def exit_status(self, container_id: str) -> str | None:
        """None while the container runs; else how it ended ("exited with code 3", "gone")."""
        def inspect() -> str | None:
            try:
                state = self.client.api.inspect_container(container_id).get("State", {})
            except docker.errors.NotFound:
                return "gone"
            except docker.errors.APIError:
                return None  # the engine could not say: not known to have ended
            if state.get("Running"):
                return None
            return f"{state.get('Status', 'exited')} with code {state.get('ExitCode', '?')}"
        return await self._call(inspect)

    async def logs_tail(self, container_id: str, lines: int = 20) -> str:
        """The container's last log lines ('' if it is gone)."""
        def tail() -> str:
            try:
                raw = self.client.api.logs(container_id, tail=lines)
            except docker.errors.APIError:
                return ""
            return bytes(raw).decode("utf-8", "replace").strip()
        return await self._call(tail)

    async def stream_logs(self, container_id: str, tail: int | str,
                          follow: bool) -> AsyncIterator[bytes]:
        """The container's log output as it comes. A follow stream ties up a thread of its
        own (not one of the pool's) until the caller stops iterating."""
        try:
            stream = await self._call(self.client.api.logs, container_id, stream=True,
                                      follow=follow, tail=tail)
        except docker.errors.NotFound:
            return
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)

        def pump() -> None:
            try:
                for chunk in stream:
                    asyncio.run_coroutine_threadsafe(chunks.put(chunk), loop).result()
            except Exception:  # closed by the reader, or the container went away
                pass
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone at exit
                    loop.call_soon_threadsafe(chunks.put_nowait, None)

        threading.Thread(target=pump, name="docker-logs", daemon=True).start()
        try:
            while (chunk := await chunks.get()) is not None:
                yield chunk
        finally:
            stream.close()

    async def remove(self, container_id: str, timeout_s: float | None = None) -> None:
        """Stop (SIGTERM, then SIGKILL after the timeout) and remove; gone already is fine.
        ContainerNotRemoved if the engine would not remove it, DockerUnavailable if no engine
        answers: either way the container may still be there."""
        timeout = self.stop_timeout_s if timeout_s is None else timeout_s
        try:
            await self._call(self._remove, container_id, timeout)
        except docker.errors.APIError as exc:
            raise ContainerNotRemoved(f"container {container_id[:12]} was not removed: "
                                      f"{exc.explanation or exc}") from exc

    def _remove(self, container_id: str, timeout: float) -> None:
        try:
            self.client.api.stop(container_id, timeout=max(0, round(timeout)))
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:  # removal with force may still work
            log.warning("container.stop_failed", container=container_id[:12], error=str(exc))
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.remove_container(container_id, force=True)

    def _remove_quietly(self, container_id: str) -> None:
        try:
            self.client.api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.warning("container.remove_failed", container=container_id[:12], error=str(exc))

    async def network_subnets(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The IPAM subnets of every network on the engine (callbacks may not reach them)."""
        networks = await self._call(self.client.api.networks)
        subnets = []
        for network in networks:
            for config in (network.get("IPAM") or {}).get("Config") or []:
                with contextlib.suppress(ValueError, TypeError):
                    subnets.append(ipaddress.ip_network(config.get("Subnet"), strict=False))
        return subnets
