"""berthd: the process entry. `berthd --config PATH` serves; `berthd check-config PATH` checks.

Signal handlers only queue a word; the serve loop acts on it (reload or stop).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import structlog
import uvloop

from berth.daemon.config import Config, ConfigError, ConfigIssue, gpu_issues, load_config
from berth.daemon.logs import setup_logging
from berth.daemon.native import compiled
from berth.daemon.sdnotify import Notifier, watchdog_interval_s
from berth.daemon.service import EXIT_CONFIG, EXIT_STATE, Berth, StartupError, summary_text
from berth.gpu import GpuSourceError, load_inventory
from berth.store.backup import BackupError, backup_version, restore

log = structlog.get_logger("berth.daemon")
DEFAULT_CONFIG = "/etc/berth/config.toml"
GC_YOUNG_THRESHOLD = 100_000  # net allocations between young collections (CPython: 700)


def check_config(path: str) -> int:
    """Validate a file (GPU counts included); print every problem by its dotted path."""
    try:
        config = load_config(path)
        issues = _gpu_check(config)
    except ConfigError as exc:
        issues = exc.issues
        if exc.partial is not None:  # still say which valid endpoints want too many GPUs
            issues = issues + [i for i in _gpu_check(exc.partial) if i.path != "gpu.source"]
    if issues:
        for issue in issues:
            print(issue, file=sys.stderr)
        print(f"{path}: {len(issues)} error(s)", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: ok ({len(config.endpoints)} endpoint(s))")
    return 0


def restore_backup(args: Sequence[str]) -> int:
    """`berthd restore FILE [--config PATH]`: replace the state database with a backup while
    no berthd runs on it; the replaced one is kept aside."""
    parser = argparse.ArgumentParser(prog="berthd restore", description="restore a backup "
                                     "(berth backup FILE) into the state dir; berthd stopped")
    parser.add_argument("file")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file (TOML)")
    opts = parser.parse_args(args)
    try:
        state = Path(load_config(opts.config).daemon.state_dir)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    try:
        version = backup_version(Path(opts.file))
        aside = restore(Path(opts.file), state)
    except BackupError as exc:
        print(f"restore refused: {exc}", file=sys.stderr)
        return EXIT_STATE
    print(f"restored {opts.file} (schema {version}) into {state / 'berth.db'}"
          + (f"; the replaced database is kept as {aside}" if aside else ""))
    return 0


def _gpu_check(config: Config) -> list[ConfigIssue]:
    try:
        inventory = load_inventory(config.gpu.source, config.gpu.devices)
    except GpuSourceError as exc:
        return [ConfigIssue("gpu.source", str(exc))]
    try:
        return gpu_issues(config.endpoints, list(inventory.gpus), config.gpu.reserve_mib)
    finally:
        inventory.close()


async def serve(config_path: str, stop_replicas_on_exit: bool) -> int:
    config = load_config(config_path)
    setup_logging(config.daemon.log_format, config.daemon.log_level)
    notifier = Notifier()
    try:
        berth = await Berth.start(config, stop_replicas_on_exit)
    except StartupError as exc:  # what had started is stopped again already
        log.error("berthd.start_failed", message="berthd cannot start", error=str(exc))
        notifier.send(f"STATUS=cannot start: {exc}")
        return exc.exit_code
    signals: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig, word in ((signal.SIGHUP, "reload"), (signal.SIGTERM, "stop"),
                      (signal.SIGINT, "stop")):
        loop.add_signal_handler(sig, signals.put_nowait, word)
    watchdog = loop.create_task(_watchdog(notifier))
    tune_gc()
    notifier.send("READY=1", f"STATUS=serving on port {berth.port}")
    log.info("berthd.ready", endpoints=len(config.endpoints), port=berth.port,
             compiled=compiled())  # the hot modules that run compiled (daemon/native.py)
    while await signals.get() == "reload":
        notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        await _reload(berth, config_path)
        notifier.send("READY=1", f"STATUS=serving on port {berth.port}")
    notifier.send("STOPPING=1")
    log.info("berthd.stopping", stop_replicas=berth.stop_replicas_on_exit)
    watchdog.cancel()
    await berth.stop()
    notifier.close()
    log.info("berthd.stopped")
    return 0


def tune_gc() -> None:
    """Fewer cycle collections: under load, collections of the objects every call allocates
    took about 15% of berthd's CPU (py-spy, 500 streamed calls). What exists after start-up
    lives as long as berthd, so it is frozen out of every later collection.

    A young collection is due after GC_YOUNG_THRESHOLD allocations net of frees, and walks
    every young object alive: the calls in flight. 500 streamed chats hold 40-60 thousand;
    at 20,000 they set off two collections a round of 7-20 ms each that found nothing (berth's
    calls leave no cycles: tests/test_proxy_http.py), holding every stream's next chunk.
    Above what such a burst holds, none runs at all (bench/RESULTS.md, 500 streams)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


async def _reload(berth: Berth, config_path: str) -> None:
    """Apply the file if it validates; otherwise log why and keep everything as it was."""
    try:
        summary = await berth.reload(load_config(config_path))
    except ConfigError as exc:
        log.error("config.reload_refused",
                  message="reload refused: config does not validate; nothing changed",
                  errors=[str(i) for i in exc.issues])
        await berth.reconciler.event("reload_refused", f"config does not validate: {exc}")
        await berth.audit_reload(config_path, f"refused: {len(exc.issues)} error(s)")
        return
    except Exception:  # (a bug, or the store failing mid-way: berthd serves on regardless)
        log.exception("config.reload_failed", message="reload failed; berthd serves on")
        await berth.audit_reload(config_path, "failed: see the berthd log")
        return
    log.info("config.reloaded", summary=summary_text(summary))
    await berth.audit_reload(config_path, "ok")


async def _watchdog(notifier: Notifier) -> None:
    interval = watchdog_interval_s()
    if interval is None or not notifier.enabled:
        return
    while True:
        notifier.send("WATCHDOG=1")
        await asyncio.sleep(interval)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check-config"]:
        if len(args) != 2:
            print("usage: berthd check-config PATH", file=sys.stderr)
            return EXIT_CONFIG
        return check_config(args[1])
    if args[:1] == ["restore"]:
        return restore_backup(args[1:])
    parser = argparse.ArgumentParser(prog="berthd", description="berth model-serving daemon "
                                     "(also: berthd check-config PATH, berthd restore FILE)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file (TOML)")
    parser.add_argument("--stop-replicas-on-exit", action="store_true",
                        help="stop every replica on SIGTERM instead of leaving them to be "
                             "adopted at the next start")
    opts = parser.parse_args(args)
    uvloop.install()  # the data plane's proxying is event-loop bound: about 1.5x the calls/s
    try:
        return asyncio.run(serve(opts.config, opts.stop_replicas_on_exit))
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
