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


@dataclass
class TaskRecord:
    """One async call and what became of it."""

    id: str
    endpoint: str
    method: str
    path: str
    created_at: float
    status: str = "queued"
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    body_file: str | None = None
    attempts: int = 0
    replica: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result_status: int | None = None
    result_type: str | None = None
    result_body: bytes | None = None
    result_file: str | None = None
    callback_url: str | None = None
    callback_state: str | None = None
    callback_attempts: int = 0
    callback_error: str | None = None
    purged_at: float | None = None
    body_size: int = 0  # bytes of the request body, inline or in its file
    principal: str = "public"  # whom its usage counts for (auth.Auth.principal)

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class EventRecord:
    ts: float
    kind: str
    message: str
    endpoint: str | None = None
    replica: str | None = None
    id: int | None = None
