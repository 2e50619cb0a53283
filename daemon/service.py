"""The running daemon: every part of berth, started in order and stopped in reverse."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from berth.daemon.app import build_app
from berth.daemon.auth import Auth
from berth.daemon.browser import BrowserGuard
from berth.daemon.config import Config, ConfigError, ConfigIssue, gpu_issues, model_issues
from berth.daemon.connections import ConnectionLimits, GuardedSite, header_deadline
from berth.daemon.core import (
    EXIT_CONFIG,
    EXIT_DOCKER,
    EXIT_STATE,
    Core,
    StartupError,
    start_core,
)
from berth.daemon.metering import UsageLedger
from berth.gpu import GpuSample
from berth.gpu.health import GpuHealthWatch, on_loop
from berth.gpu.inventory import NvmlInventory
from berth.scheduler.callbacks import CallbackSender
from berth.scheduler.dispatch import Dispatcher, DispatchSettings
from berth.scheduler.egress import CallbackPolicy
from berth.scheduler.reconciler import ChangeSummary, Reconciler
from berth.scheduler.router import Router
from berth.store.audit import AuditRecord
from berth.store.backup import BackupError, lock_state_dir

log = structlog.get_logger("berth.daemon")

REPLICA_HISTORY_S = 7 * 86400  # stopped/failed replicas are kept this long for inspection
__all__ = ["EXIT_CONFIG", "EXIT_DOCKER", "EXIT_STATE", "Berth", "StartupError",
           "callback_secret", "read_admin_token"]


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
        if not token:  # a file meant to protect the API must not leave it open
            raise StartupError(f"daemon.admin_token_file: {path} is empty", EXIT_CONFIG)
    if not token:
        log.warning("berthd.open_mode", message="no admin token: the control API is open to "
                    "every local user (daemon.admin_token_file or BERTH_ADMIN_TOKEN)")
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


class PeriodicJobs:
    """berthd's timed jobs (APScheduler, at most one run of each at a time). `stop` cancels
    the runs under way, and those end quietly: APScheduler logs a cancelled run as an error,
    and a SIGTERM landing during a reconcile pass did just that."""

    def __init__(self) -> None:
        self.scheduler = AsyncIOScheduler()
        self.stopping = False

    def add(self, work: Callable[[], Awaitable[None]], name: str, seconds: float,
            **options: Any) -> None:
        self.scheduler.add_job(self.quiet_at_stop(work), "interval", seconds=seconds, id=name,
                               max_instances=1, coalesce=True, **options)

    def quiet_at_stop(self, work: Callable[[], Awaitable[None]]
                      ) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            try:
                await work()
            except asyncio.CancelledError:
                if not self.stopping:
                    raise
        return run

    def stop(self) -> None:
        self.stopping = True
        self.scheduler.shutdown(wait=False)


@dataclass
class Berth:
    """A started berthd: every part on one AsyncExitStack, none optional. `start` builds it
    (a failed start unwinds what started); `stop` closes the stack, in reverse order:

    1. periodic jobs (no new passes or samples);
    2. the HTTP listener (in-flight calls get shutdown_grace_s);
    3. async dispatch and callbacks (running tasks stay `running` and resume at the next
       start, undelivered callbacks too);
    4. the reconciler (replicas are stopped only with stop_replicas_on_exit, else adopted
       by the next berthd), then prober, Docker client, store and GPU inventory.
    """

    config: Config
    core: Core
    dispatcher: Dispatcher
    port: int  # the port actually bound (listen may say 0)
    stack: AsyncExitStack
    stop_replicas_on_exit: bool
    gpu_samples: dict[str, GpuSample]

    @property
    def reconciler(self) -> Reconciler:
        return self.core.reconciler

    @classmethod
    async def start(cls, config: Config, stop_replicas_on_exit: bool = False) -> Berth:
        stack = AsyncExitStack()
        try:
            return await cls._start(config, stack, stop_replicas_on_exit
                                    or config.daemon.stop_replicas_on_exit)
        except BaseException:
            await stack.aclose()
            raise

    @classmethod
    async def _start(cls, config: Config, stack: AsyncExitStack,
                     stop_replicas: bool) -> Berth:
        listen = Listen.parse(config.daemon.listen)
        token = read_admin_token(config)
        if not listen.loopback and not token:
            raise StartupError(f"daemon.listen is {config.daemon.listen}, not loopback: set "
                               "an admin token (daemon.admin_token_file or BERTH_ADMIN_TOKEN)",
                               EXIT_CONFIG)
        _lock_state(config, stack)
        core = await start_core(config, stack, lambda: stop_replicas)
        issues = gpu_issues(config.endpoints, list(core.inventory.gpus),
                            config.gpu.reserve_mib)
        issues += model_issues_with_api(config, core.reconciler)
        if issues:
            raise StartupError(str(ConfigError(issues)), EXIT_CONFIG)
        await core.reconciler.apply_specs(config.endpoints, "config")
        dispatcher = await _start_dispatch(config, core, stack)
        samples: dict[str, GpuSample] = {}
        port = await _listen(config, core, dispatcher, samples, listen, token, stack)
        berth = cls(config, core, dispatcher, port, stack, stop_replicas, samples)
        berth._start_jobs()
        core.reconciler.kick()
        return berth

    def _start_jobs(self) -> None:
        jobs, daemon = PeriodicJobs(), self.config.daemon
        jobs.add(self.reconciler.run_pass, "reconcile", daemon.reconcile_interval_s)
        if isinstance(self.core.inventory, NvmlInventory):
            jobs.add(self._sample_gpus, "gpu-sample", self.config.gpu.sample_interval_s,
                     next_run_time=_now())
            watch = GpuHealthWatch(self.core.inventory.nvml, self.core.inventory.handles,
                                   on_loop(asyncio.get_running_loop(), self.reconciler.gpu_sick))
            watch.start()
            self.stack.callback(watch.stop)
        jobs.add(self._prune, "prune", daemon.prune_interval_s)
        jobs.add(self._purge_results, "purge-results", daemon.purge_interval_s)
        jobs.scheduler.start()
        self.stack.callback(jobs.stop)

    async def _sample_gpus(self) -> None:
        samples = await asyncio.get_running_loop().run_in_executor(
            None, self.core.inventory.sample)
        self.gpu_samples.clear()
        self.gpu_samples.update(samples)
        inventory = self.core.inventory
        for uuid, why in list(getattr(inventory, "lost", {}).items()):
            await self.reconciler.gpu_sick(uuid, why)  # NVML said "GPU is lost" when sampled

    async def _purge_results(self) -> None:
        await self.dispatcher.purge(self.config.daemon.result_ttl_s)

    async def _prune(self) -> None:
        """Old replicas, events, audit rows and finished tasks go; their pages go back."""
        now, daemon, store = time.time(), self.config.daemon, self.core.store
        await store.prune_replicas(now - REPLICA_HISTORY_S)
        pruned = await store.retention.prune(now - daemon.events_ttl_s,
                                             now - daemon.audit_ttl_s,
                                             now - daemon.finished_tasks_ttl_s)
        if pruned.events or pruned.audit or pruned.tasks or pruned.pages_freed:
            log.info("store.pruned", events=pruned.events, audit=pruned.audit,
                     tasks=pruned.tasks, pages_freed=pruned.pages_freed)

    async def reload(self, config: Config) -> ChangeSummary:
        """Apply a new, already validated config; ConfigError if it cannot apply here."""
        def check() -> None:  # (with the API's endpoint writes held off: see apply_specs)
            issues = gpu_issues(config.endpoints, list(self.core.inventory.gpus),
                                config.gpu.reserve_mib)
            issues += model_issues_with_api(config, self.reconciler)
            if issues:
                raise ConfigError(issues)

        summary = await self.reconciler.apply_specs(config.endpoints, "config", check)
        for section in ("daemon", "docker", "gpu"):
            if getattr(config, section) != getattr(self.config, section):
                log.warning("config.needs_restart", section=section,
                            message="settings need a restart to apply")
        self.config = config.model_copy(update={"daemon": self.config.daemon,
                                                "docker": self.config.docker,
                                                "gpu": self.config.gpu})
        await self.reconciler.event("reload", f"config reloaded: {summary_text(summary)}")
        return summary

    async def audit_reload(self, config_path: str, outcome: str) -> None:
        """A reload by signal, in the audit log beside the API's writes."""
        record = AuditRecord(time.time(), "sighup", "-", "config.reload", config_path, 0,
                             outcome)
        try:
            await self.core.store.audit.add(record)
        except (sqlite3.Error, OSError) as exc:
            log.warning("audit.not_stored", error=str(exc), action="config.reload")

    async def stop(self) -> None:
        """Stop every part, in the order of the class docstring."""
        await self.stack.aclose()


def _lock_state(config: Config, stack: AsyncExitStack) -> None:
    """One berthd per state dir (a second one, or a restore, is refused while it runs)."""
    state = Path(config.daemon.state_dir)
    try:
        state.mkdir(parents=True, exist_ok=True)
        fd = lock_state_dir(state)
    except BackupError as exc:
        raise StartupError(str(exc), EXIT_STATE) from exc
    except OSError:
        return  # an unusable state dir: opening the store says why, in its words
    stack.callback(os.close, fd)


def model_issues_with_api(config: Config, reconciler: Reconciler) -> list[ConfigIssue]:
    """Model names the file's endpoints share with each other or with API-created ones."""
    api = [p.spec for p in reconciler.live_pools()
           if p.source == "api" and p.name not in config.endpoints]
    return model_issues([*config.endpoints.values(), *api])


async def _start_dispatch(config: Config, core: Core, stack: AsyncExitStack) -> Dispatcher:
    daemon = config.daemon
    policy = CallbackPolicy(daemon.callback_allow, core.runtime.network_subnets)
    callbacks = CallbackSender(core.store, callback_secret(config), daemon.callback_retry_s,
                               daemon.callback_backoff_s, policy)
    stack.push_async_callback(callbacks.close)
    settings = DispatchSettings(daemon.task_max_attempts, daemon.task_retry_backoff_s)
    dispatcher = Dispatcher(core.store, Router(core.reconciler),
                            Path(daemon.state_dir) / "tasks", callbacks, settings)
    stack.push_async_callback(dispatcher.stop)
    await dispatcher.start()
    return dispatcher


async def _listen(config: Config, core: Core, dispatcher: Dispatcher,
                  samples: dict[str, GpuSample], listen: Listen, token: str,
                  stack: AsyncExitStack) -> int:
    """Serve the app on the listener; the bound port."""
    daemon = config.daemon
    auth = Auth(admin=token)
    await auth.load(core.store)
    app = build_app(core.reconciler, core.allocator, token, samples, auth=auth,
                    max_body_bytes=daemon.max_body_bytes, dispatcher=dispatcher,
                    max_async_body_bytes=daemon.max_async_body_bytes,
                    min_free_disk=daemon.min_free_disk,
                    volume_prefixes=tuple(daemon.allowed_volume_prefixes),
                    gpu_readings=core.inventory.readings,
                    body_timeout_s=daemon.body_timeout_s,
                    usage=UsageLedger(core.store.usage, daemon.usage_flush_s,
                                      daemon.usage_accounting),
                    guard=BrowserGuard.build(listen.host, daemon.allowed_hosts,
                                             daemon.allowed_origins))
    # First, and before setup freezes the app: it stops the connection's header clock
    # while a request is served, around everything the request does.
    app.middlewares.insert(0, header_deadline)
    # handler_cancellation: a client that leaves cancels its call and frees its slot.
    runner = web.AppRunner(app, shutdown_timeout=daemon.shutdown_grace_s, access_log=None,
                           handler_cancellation=True,
                           keepalive_timeout=daemon.keepalive_timeout_s)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    limits = ConnectionLimits(daemon.header_timeout_s, daemon.max_connections,
                              daemon.max_connections_per_client, daemon.keepalive_timeout_s)
    site = GuardedSite(runner, listen.host, listen.port, limits,
                       grace_s=daemon.shutdown_grace_s)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"daemon.listen: cannot listen on {listen.host}:{listen.port}: "
                           f"{exc.strerror}", EXIT_CONFIG) from exc
    log.info("berthd.listening", address=f"{listen.host}:{site.port}")
    return site.port


def summary_text(summary: ChangeSummary) -> str:
    parts = [f"{label} {', '.join(names)}" for label, names in (
        ("created", summary.created), ("rolled", summary.rolled), ("updated", summary.updated),
        ("removed", summary.removed)) if names]
    return "; ".join(parts) or "nothing changed"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
