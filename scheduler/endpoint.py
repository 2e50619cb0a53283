"""An endpoint as the reconciler knows it: its spec and where it stands (generation, error,
failures in a row and the backoff they earned, removal).

Owned by the reconciler, which changes it only through the methods here; the one other writer
is a replica's lifecycle, which reports a failure (`count_failure`). The endpoint's replicas,
their slots and the calls waiting for one are the pool's (scheduler.pool), which reads this."""

from __future__ import annotations

from dataclasses import dataclass

from berth.daemon.config import EndpointSpec
from berth.scheduler.policy import backoff_delay, failures_after


@dataclass
class Endpoint:
    spec: EndpointSpec
    source: str  # "config" or "api"
    generation: int = 1
    error: str | None = None  # why the endpoint cannot run (image missing, secret missing...)
    failures: int = 0  # replica failures in a row; reset when one becomes ready
    next_start_at: float = 0.0  # backoff: no replica is started before this time
    removed: bool = False  # deleted: its replicas drain and stop
    created_at: float = 0.0  # when the endpoint was first stored (unix time)

    @property
    def name(self) -> str:
        return self.spec.name

    def apply(self, spec: EndpointSpec, source: str, generation: int) -> None:
        """A new (or the same) spec, already stored: errors and backoff start afresh."""
        self.spec, self.source, self.generation = spec, source, generation
        self.error, self.removed, self.failures, self.next_start_at = None, False, 0, 0.0

    def set_error(self, error: str | None) -> None:
        self.error = error

    def mark_removed(self) -> None:
        self.removed = True

    def retry_now(self) -> None:
        """Start the next replica without waiting out the backoff (e.g. a secret arrived)."""
        self.next_start_at = 0.0

    def count_failure(self, ready_at: float | None, now: float) -> None:
        """A replica failed: one more in the row (unless it had run long) and back off."""
        self.failures = failures_after(self.failures, ready_at, now)
        self.next_start_at = now + backoff_delay(self.failures)
