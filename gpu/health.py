"""GPU health from NVML events: critical Xid errors and double-bit ECC errors make a GPU
unhealthy; Xids that are the application's fault (13, 31, 43, 45, 68, 109) do not.

The watch waits on an NVML event set in a thread of its own (a blocking wait must never hold
the event loop) and reports each sick GPU once through `report(uuid, reason)`, which the
daemon hands to the event loop (the reconciler marks the GPU and moves its replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

log = structlog.get_logger("berth.gpu")

EVENT_DOUBLE_BIT_ECC = 0x2
REARM_MAX_S = 30.0  # the longest wait between attempts to watch events again
EVENT_XID_CRITICAL = 0x8
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})  # the model's fault, not the GPU's
XID_MEANING = {48: "double-bit ECC error", 63: "ECC page retirement", 64: "ECC page "
               "retirement failed", 74: "NVLink error", 79: "fell off the bus",
               92: "high single-bit ECC rate", 94: "contained ECC error",
               95: "uncontained ECC error", 119: "GSP timeout", 120: "GSP error"}


def event_verdict(event_type: int, xid: int) -> str | None:
    """Why an NVML event makes its GPU unhealthy; None for the application's own errors."""
    if event_type & EVENT_DOUBLE_BIT_ECC:
        return "double-bit ECC error"
    if event_type & EVENT_XID_CRITICAL and xid not in APPLICATION_XIDS:
        meaning = XID_MEANING.get(xid)
        return f"Xid {xid}" + (f" ({meaning})" if meaning else "")
    return None


def handle_key(handle: Any) -> int:
    """A handle's identity: pynvml's are ctypes pointers (compared by address)."""
    if isinstance(handle, int):
        return handle
    try:
        return ctypes.addressof(handle.contents)
    except (AttributeError, ValueError, TypeError):
        return id(handle)


class GpuHealthWatch:
    """Reports GPUs that NVML events show sick (the reconciler marks each once), until `stop`.

    `handles` gives the GPUs' current NVML handles: when waiting for events fails (NVML went
    away, e.g. a driver upgrade, and the inventory re-initialised it), the watch registers
    again with fresh handles, backing off from `wait_ms` to REARM_MAX_S while that fails."""

    def __init__(self, nvml: Any, handles: Callable[[], Sequence[tuple[Any, str]]],
                 report: Callable[[str, str], None], wait_ms: int = 1000) -> None:
        self.nvml, self.report, self.wait_ms = nvml, report, wait_ms
        self.handles = handles
        self.uuids: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="berth-gpu-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.wait_ms / 1000 + 5)

    def _register(self) -> Any:
        nvml, wanted = self.nvml, EVENT_XID_CRITICAL | EVENT_DOUBLE_BIT_ECC
        handles = self.handles()
        self.uuids = {handle_key(h): uuid for h, uuid in handles}
        event_set = nvml.nvmlEventSetCreate()
        for handle, _ in handles:
            try:
                supported = nvml.nvmlDeviceGetSupportedEventTypes(handle)
                nvml.nvmlDeviceRegisterEvents(handle, supported & wanted, event_set)
            except nvml.NVMLError as exc:  # a GPU without events is still sampled
                log.warning("gpu.events_unavailable", error=str(exc))
        return event_set

    def _run(self) -> None:
        try:
            event_set = self._register()
        except Exception as exc:  # no events at all: say so; sampling still finds lost GPUs
            log.error("gpu.health_watch_off", error=repr(exc))
            return
        while event_set is not None:
            event_set = self._watch(event_set)
            if event_set is None:
                return  # stopped
            event_set = self._rearm()

    def _watch(self, event_set: Any) -> Any:
        """Judge events until stopped (None) or until waiting fails (the dead set back)."""
        nvml = self.nvml
        while not self._stop.is_set():
            try:
                event = nvml.nvmlEventSetWait(event_set, self.wait_ms)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) == 10:  # NVML_ERROR_TIMEOUT: nothing came
                    continue
                log.warning("gpu.health_watch_paused", error=str(exc),
                            message="waiting for GPU events failed (NVML away?): the watch "
                            "registers again once NVML answers")
                with contextlib.suppress(nvml.NVMLError):
                    nvml.nvmlEventSetFree(event_set)
                return event_set
            self._judge(event)
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlEventSetFree(event_set)
        return None

    def _rearm(self) -> Any:
        """A new event set on fresh handles, tried with backoff; None once stopped."""
        delay = self.wait_ms / 1000
        while not self._stop.wait(delay):
            try:
                event_set = self._register()
            except self.nvml.NVMLError:
                delay = min(delay * 2, REARM_MAX_S)
                continue
            log.info("gpu.health_watch_rearmed", message="watching GPU events again",
                     gpus=len(self.uuids))
            return event_set
        return None

    def _judge(self, event: Any) -> None:
        uuid = self.uuids.get(handle_key(event.device))
        verdict = event_verdict(int(event.eventType), int(event.eventData))
        log.info("gpu.event", gpu=uuid, event_type=int(event.eventType),
                 xid=int(event.eventData), verdict=verdict)
        if uuid is not None and verdict is not None:
            self.report(uuid, verdict)  # marked once: reports of a marked GPU change nothing


def on_loop(loop: asyncio.AbstractEventLoop, mark: Callable[[str, str], Awaitable[None]]
            ) -> Callable[[str, str], None]:
    """A `report` for the watch's thread that runs `mark(uuid, reason)` on the event loop."""
    tasks: set[asyncio.Future[None]] = set()

    def schedule(uuid: str, reason: str) -> None:
        task = asyncio.ensure_future(mark(uuid, reason))
        tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(tasks.discard)

    def report(uuid: str, reason: str) -> None:
        loop.call_soon_threadsafe(schedule, uuid, reason)

    return report
