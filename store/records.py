"""Plain data objects that cross the store's boundary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EndpointRecord:
    name: str
    spec: dict[str, Any]
    source: str  # "config" or "api"
    generation: int = 1
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass
class ReplicaRecord:
    id: str
    endpoint: str
    generation: int
    state: str
    created_at: float
    container_id: str | None = None
    address: str | None = None
    gpus: list[str] = field(default_factory=list)
    started_at: float | None = None
    ready_at: float | None = None
    last_call_at: float | None = None
    stopped_at: float | None = None
    failures: int = 0
    reason: str | None = None


@dataclass(frozen=True)
class EventRecord:
    ts: float
    kind: str
    message: str
    endpoint: str | None = None
    replica: str | None = None
    id: int | None = None
