"""The running daemon: every part of berth, started in order and stopped in reverse."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from berth.daemon.app import build_app
from berth.daemon.auth import Auth
from berth.daemon.browser import BrowserGuard
from berth.daemon.config import Config, ConfigError, gpu_issues
from berth.daemon.connections import ConnectionLimits, GuardedSite, header_deadline
from berth.gpu import GpuAllocator, GpuSample, GpuSourceError, Inventory, load_inventory
from berth.scheduler.callbacks import CallbackSender
from berth.scheduler.dispatch import Dispatcher, DispatchSettings
from berth.scheduler.egress import CallbackPolicy
from berth.scheduler.probes import Prober
from berth.scheduler.reconciler import ChangeSummary, Reconciler
from berth.scheduler.router import Router
from berth.scheduler.runtime import DockerRuntime, DockerUnavailable
from berth.store import Store, StoreError

log = structlog.get_logger("berth.daemon")

EXIT_CONFIG = 2
EXIT_STATE = 3
EXIT_DOCKER = 4
REPLICA_HISTORY_S = 7 * 86400  # stopped/failed replicas are kept this long for inspection


class StartupError(Exception):
    """berthd cannot start; `exit_code` tells systemd and scripts which part failed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Listen:
        host, _, port = text.rpartition(":")
        return cls(host.strip("[]"), int(port))

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def read_admin_token(config: Config) -> str:
    """BERTH_ADMIN_TOKEN, else the first line of daemon.admin_token_file, else ''."""
    token = os.environ.get("BERTH_ADMIN_TOKEN", "")
    path = config.daemon.admin_token_file
    if not token and path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as exc:
            raise StartupError(f"daemon.admin_token_file: cannot read {path}: {exc.strerror}",
                               EXIT_CONFIG) from exc
    return token


def callback_secret(config: Config) -> bytes:
    """daemon.callback_secret_file, else BERTH_CALLBACK_SECRET, else a key made once and kept
    in state_dir/callback-secret (0600), so signatures stay valid across restarts."""
    path = config.daemon.callback_secret_file
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as exc:
            raise StartupError(f"daemon.callback_secret_file: cannot read {path}: "
                               f"{exc.strerror}", EXIT_CONFIG) from exc
        if not key:
            raise StartupError(f"daemon.callback_secret_file: {path} is empty", EXIT_CONFIG)
        return key.encode()
    if os.environ.get("BERTH_CALLBACK_SECRET"):
        return os.environ["BERTH_CALLBACK_SECRET"].encode()
    kept = Path(config.daemon.state_dir) / "callback-secret"
    if not kept.exists():
        write_private(kept, secrets.token_hex(32) + "\n")
    key = kept.read_text().strip()
    if not key:
        raise StartupError(f"{kept} is empty: remove it to have a new callback key made",
                           EXIT_CONFIG)
    return key.encode()


def write_private(path: Path, text: str) -> None:
    """Write a 0600 file whole or not at all: temp file, fsync, rename, fsync the dir."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Berth:
    """berthd's parts: store, GPUs, Docker runtime, reconciler, periodic jobs, HTTP listener."""

    def __init__(self, config: Config, stop_replicas_on_exit: bool = False) -> None:
        self.config = config
        self.stop_replicas_on_exit = stop_replicas_on_exit or config.daemon.stop_replicas_on_exit
        self.gpu_samples: dict[str, GpuSample] = {}
        self.store: Store | None = None
        self.inventory: Inventory | None = None
        self.runtime: DockerRuntime | None = None
        self.prober = Prober()
        self.reconciler: Reconciler | None = None
        self.runner: web.AppRunner | None = None
        self.dispatcher: Dispatcher | None = None
        self.callbacks: CallbackSender | None = None
        self.jobs = AsyncIOScheduler()
        self.port: int | None = None  # the port actually bound (listen may say 0)

    async def start(self) -> None:
        cfg = self.config
        listen = Listen.parse(cfg.daemon.listen)
        token = read_admin_token(cfg)
        if not listen.loopback and not token:
            raise StartupError(f"daemon.listen is {cfg.daemon.listen}, not loopback: set an admin "
                               "token (daemon.admin_token_file or BERTH_ADMIN_TOKEN)", EXIT_CONFIG)
        try:
            self.inventory = load_inventory(cfg.gpu.source, cfg.gpu.devices)
        except GpuSourceError as exc:
            raise StartupError(f"gpu.source: {exc}", EXIT_CONFIG) from exc
        issues = gpu_issues(cfg.endpoints, list(self.inventory.gpus))
        if issues:
            raise StartupError(str(ConfigError(issues)), EXIT_CONFIG)
        try:
            self.store = await Store.open(cfg.daemon.state_dir)
        except StoreError as exc:
            raise StartupError(str(exc), EXIT_STATE) from exc
        allocator = GpuAllocator(self.inventory.gpus, self.store)
        self.runtime = DockerRuntime(cfg.docker.host, cfg.docker.network,
                                     cfg.docker.stop_timeout_s, cfg.docker.pull,
                                     egress=cfg.docker.egress,
                                     subnet_pool=cfg.docker.subnet_pool)
        try:
            await self.runtime.connect()
        except DockerUnavailable as exc:
            raise StartupError(str(exc), EXIT_DOCKER) from exc
        self.reconciler = Reconciler(self.store, allocator, self.runtime, self.prober,
                                     gpu_mode=self._gpu_mode())
        await self.reconciler.load()
        await self.reconciler.adopt()
        await self.reconciler.apply_specs(cfg.endpoints, "config")
        self.dispatcher = self._dispatcher()
        await self.dispatcher.start()
        await self._listen(listen, token, allocator)
        self._start_jobs()
        self.reconciler.kick()

    def _dispatcher(self) -> Dispatcher:
        assert self.store is not None and self.reconciler is not None
        assert self.runtime is not None
        daemon = self.config.daemon
        policy = CallbackPolicy(daemon.callback_allow, self.runtime.network_subnets)
        self.callbacks = CallbackSender(self.store, callback_secret(self.config),
                                        daemon.callback_retry_s, daemon.callback_backoff_s,
                                        policy)
        settings = DispatchSettings(daemon.task_max_attempts, daemon.task_retry_backoff_s)
        return Dispatcher(self.store, Router(self.reconciler), Path(daemon.state_dir) / "tasks",
                          self.callbacks, settings)

    def _gpu_mode(self) -> str:
        mode = self.config.docker.gpu_mode
        if mode != "auto":
            return mode
        return "nvidia" if self.config.gpu.source == "nvml" else "env"

    async def _listen(self, listen: Listen, token: str, allocator: GpuAllocator) -> None:
        assert self.reconciler is not None
        auth = Auth(admin=token)
        assert self.store is not None
        await auth.load(self.store)
        app = build_app(self.reconciler, allocator, token, self.gpu_samples, auth=auth,
                        max_body_bytes=self.config.daemon.max_body_bytes,
                        dispatcher=self.dispatcher,
                        max_async_body_bytes=self.config.daemon.max_async_body_bytes,
                        min_free_disk=self.config.daemon.min_free_disk,
                        volume_prefixes=tuple(self.config.daemon.allowed_volume_prefixes),
                        guard=BrowserGuard.build(listen.host, self.config.daemon.allowed_hosts,
                                                 self.config.daemon.allowed_origins))
        daemon = self.config.daemon
        # First, and before setup freezes the app: it stops the connection's header clock
        # while a request is served, around everything the request does.
        app.middlewares.insert(0, header_deadline)
        # handler_cancellation: a client that leaves cancels its call and frees its slot.
        self.runner = web.AppRunner(app, shutdown_timeout=daemon.shutdown_grace_s,
                                    access_log=None, handler_cancellation=True,
                                    keepalive_timeout=daemon.keepalive_timeout_s)
        await self.runner.setup()
        limits = ConnectionLimits(daemon.header_timeout_s, daemon.max_connections,
                                  daemon.max_connections_per_client)
        site = GuardedSite(self.runner, listen.host, listen.port, limits)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"daemon.listen: cannot listen on {listen.host}:{listen.port}: "
                               f"{exc.strerror}", EXIT_CONFIG) from exc
        self.port = site.port  # the bound one: listen may ask for port 0
        log.info("berthd.listening", address=f"{listen.host}:{self.port}")

    def _start_jobs(self) -> None:
        assert self.reconciler is not None
        self.jobs.add_job(self.reconciler.run_pass, "interval",
                          seconds=self.config.daemon.reconcile_interval_s,
                          max_instances=1, coalesce=True, id="reconcile")
        if self.inventory is not None and self.inventory.source == "nvml":
            self.jobs.add_job(self._sample_gpus, "interval",
                              seconds=self.config.gpu.sample_interval_s, max_instances=1,
                              coalesce=True, id="gpu-sample", next_run_time=_now())
        self.jobs.add_job(self._prune, "interval", hours=1, id="prune")
        self.jobs.add_job(self._purge_results, "interval", id="purge-results",
                          seconds=self.config.daemon.purge_interval_s, max_instances=1,
                          coalesce=True)
        self.jobs.start()

    async def _sample_gpus(self) -> None:
        assert self.inventory is not None
        samples = await asyncio.get_running_loop().run_in_executor(None, self.inventory.sample)
        self.gpu_samples.clear()
        self.gpu_samples.update(samples)

    async def _purge_results(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.purge(self.config.daemon.result_ttl_s)

    async def _prune(self) -> None:
        if self.store is not None:
            await self.store.prune_replicas(time.time() - REPLICA_HISTORY_S)

    async def reload(self, config: Config) -> ChangeSummary:
        """Apply a new, already validated config; ConfigError if it cannot apply here."""
        assert self.reconciler is not None and self.inventory is not None
        issues = gpu_issues(config.endpoints, list(self.inventory.gpus))
        if issues:
            raise ConfigError(issues)
        for section in ("daemon", "docker", "gpu"):
            if getattr(config, section) != getattr(self.config, section):
                log.warning("config.needs_restart", section=section,
                            message="settings need a restart to apply")
        self.config = config.model_copy(update={"daemon": self.config.daemon,
                                                "docker": self.config.docker,
                                                "gpu": self.config.gpu})
        summary = await self.reconciler.apply_specs(config.endpoints, "config")
        await self.reconciler.event("reload", f"config reloaded: {summary_text(summary)}")
        return summary

    async def stop(self) -> None:
        """Ordered shutdown: each step assumes the ones before it are done."""
        # 1. No new reconcile passes or samples.
        if self.jobs.running:
            self.jobs.shutdown(wait=False)
        # 2. Stop accepting connections; in-flight requests get up to shutdown_grace_s.
        if self.runner is not None:
            await self.runner.cleanup()
        # 3. Stop dispatching; running tasks stay "running" in SQLite and are queued again at
        #    the next start. Undelivered callbacks resume then too.
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.callbacks is not None:
            await self.callbacks.close()
        # 4. Stop watching replicas; stop them too only if asked (else they are adopted later).
        if self.reconciler is not None:
            await self.reconciler.shutdown(self.stop_replicas_on_exit)
        # 5. Close clients and the database last: the steps above still record events.
        await self.prober.close()
        if self.runtime is not None:
            await self.runtime.close()
        if self.inventory is not None:
            self.inventory.close()
        if self.store is not None:
            await self.store.close()


def summary_text(summary: ChangeSummary) -> str:
    parts = [f"{label} {', '.join(names)}" for label, names in (
        ("created", summary.created), ("rolled", summary.rolled), ("updated", summary.updated),
        ("removed", summary.removed)) if names]
    return "; ".join(parts) or "nothing changed"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
