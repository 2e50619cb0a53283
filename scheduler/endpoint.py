"""An endpoint as the reconciler knows it: its spec and where it stands (generation, error,
failures in a row and the backoff they earned, removal, where its last starts went).

Owned by the reconciler, which changes it only through the methods here; the one other writer
is a replica's lifecycle, which reports a failure (`count_failure`) and a start
(`record_start`). The endpoint's replicas,
their slots and the calls waiting for one are the pool's (scheduler.pool), which reads this."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field, fields

from berth.daemon.config import EndpointSpec
from berth.scheduler.policy import backoff_delay, failures_after

STARTS_KEPT = 10


@dataclass(frozen=True)
class StartPhases:
    """Where one replica's start went, in seconds: pulling the image, creating the
    container, starting it until it runs, and loading (running until readiness passed)."""

    pull_s: float
    create_s: float
    start_s: float
    load_s: float

    @property
    def total_s(self) -> float:
        return self.pull_s + self.create_s + self.start_s + self.load_s

    def text(self) -> str:
        return ", ".join(f"{f.name[:-2]} {getattr(self, f.name):.2f} s" for f in fields(self))


def median_phases(starts: list[StartPhases]) -> StartPhases:
    """Each phase's median over `starts` (not empty)."""
    return StartPhases(*(statistics.median(getattr(s, f.name) for s in starts)
                         for f in fields(StartPhases)))


@dataclass
class Endpoint:
    spec: EndpointSpec
    source: str  # "config" or "api"
    generation: int = 1
    error: str | None = None  # why the endpoint cannot run (image missing, secret missing...)
    failures: int = 0  # replica failures in a row; reset when one becomes ready
    next_start_at: float = 0.0  # backoff: no replica is started before this time
    removed: bool = False  # deleted: its replicas drain and stop
    purge_cache: bool = False  # deleted with its cache volume
    created_at: float = 0.0  # when the endpoint was first stored (unix time)
    starts: deque[StartPhases] = field(default_factory=lambda: deque(maxlen=STARTS_KEPT))

    @property
    def name(self) -> str:
        return self.spec.name

    def apply(self, spec: EndpointSpec, source: str, generation: int) -> None:
        """A new (or the same) spec, already stored: errors and backoff start afresh."""
        self.spec, self.source, self.generation = spec, source, generation
        self.error, self.removed, self.failures, self.next_start_at = None, False, 0, 0.0
        self.purge_cache = False

    def set_error(self, error: str | None) -> None:
        self.error = error

    def mark_removed(self, purge_cache: bool = False) -> None:
        self.removed, self.purge_cache = True, purge_cache

    def retry_now(self) -> None:
        """Start the next replica without waiting out the backoff (e.g. a secret arrived)."""
        self.next_start_at = 0.0

    def record_start(self, phases: StartPhases) -> None:
        """A replica became ready: where its start went (the last STARTS_KEPT are kept)."""
        self.starts.append(phases)

    def count_failure(self, ready_at: float | None, now: float) -> None:
        """A replica failed: one more in the row (unless it had run long) and back off."""
        self.failures = failures_after(self.failures, ready_at, now)
        self.next_start_at = now + backoff_delay(self.failures)
