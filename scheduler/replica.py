"""Replica states, the one table of legal moves between them, and the replica record."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from berth.store.records import ReplicaRecord


class ReplicaState(StrEnum):
    PENDING = "pending"    # waiting for GPUs
    STARTING = "starting"  # container running, readiness not yet passed
    READY = "ready"        # takes calls
    SLEEPING = "sleeping"  # idle, put to sleep by its sleep tier; woken (back to ready) by demand
    DRAINING = "draining"  # no new calls; in-flight ones finish
    STOPPED = "stopped"    # container removed, GPUs freed
    FAILED = "failed"      # exited, failed probes or startup timeout; container removed


S = ReplicaState
TRANSITIONS: dict[ReplicaState, frozenset[ReplicaState]] = {
    S.PENDING: frozenset({S.STARTING, S.FAILED, S.STOPPED}),
    S.STARTING: frozenset({S.READY, S.DRAINING, S.FAILED, S.STOPPED}),
    S.READY: frozenset({S.SLEEPING, S.DRAINING, S.FAILED, S.STOPPED}),
    S.SLEEPING: frozenset({S.READY, S.DRAINING, S.FAILED, S.STOPPED}),
    S.DRAINING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset(),
}
LIVE = frozenset({S.PENDING, S.STARTING, S.READY, S.SLEEPING, S.DRAINING})
SETTLED = frozenset({S.READY, S.FAILED, S.STOPPED})  # moves that wake waiters


class IllegalTransition(Exception):
    def __init__(self, replica: str, old: ReplicaState, new: ReplicaState) -> None:
        super().__init__(f"replica {replica}: illegal transition {old} -> {new}")


@dataclass
class Replica:
    """One container of an endpoint. Its `state` changes only through
    ReplicaLifecycle.transition (scheduler.lifecycle), by the table above."""

    id: str
    endpoint: str
    generation: int
    state: ReplicaState
    created_at: float
    container_id: str | None = None
    address: str | None = None  # "ip:port" on the berth network
    gpus: list[str] = field(default_factory=list)
    started_at: float | None = None
    ready_at: float | None = None
    last_call_at: float | None = None
    stopped_at: float | None = None
    failures: int = 0
    reason: str | None = None
    in_flight: int = 0  # calls being served now; not persisted

    @property
    def idle_since(self) -> float:
        """When the replica last did (or became able to do) work."""
        return self.last_call_at or self.ready_at or self.started_at or self.created_at

    def check_move(self, new: ReplicaState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.id, self.state, new)

    def record(self) -> ReplicaRecord:
        return ReplicaRecord(
            id=self.id, endpoint=self.endpoint, generation=self.generation, state=self.state.value,
            created_at=self.created_at, container_id=self.container_id, address=self.address,
            gpus=list(self.gpus), started_at=self.started_at, ready_at=self.ready_at,
            last_call_at=self.last_call_at, stopped_at=self.stopped_at, failures=self.failures,
            reason=self.reason)

    @classmethod
    def from_record(cls, rec: ReplicaRecord) -> Replica:
        return cls(
            id=rec.id, endpoint=rec.endpoint, generation=rec.generation,
            state=ReplicaState(rec.state), created_at=rec.created_at,
            container_id=rec.container_id, address=rec.address, gpus=list(rec.gpus),
            started_at=rec.started_at, ready_at=rec.ready_at, last_call_at=rec.last_call_at,
            stopped_at=rec.stopped_at, failures=rec.failures, reason=rec.reason)
