"""Pydantic models of what the HTTP API sends and takes, for /openapi.json.

Request bodies are the models that validate them (EndpointSpec is the config file's model).
Response models describe the JSON the handlers build; tests check real answers against them
(schemathesis validates every answer it gets against this document).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, create_model
from pydantic.fields import FieldInfo

from berth.daemon.config import EndpointFields, EndpointSpec


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Model):
    path: str
    message: str


class ErrorInfo(Model):
    code: str
    message: str
    details: list[ErrorDetail] | None = None


class ErrorBody(Model):
    """Every error answer: {"error": {"code", "message", "details"?}}."""

    error: ErrorInfo


class OpenAIErrorInfo(Model):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIError(Model):
    """Errors of the OpenAI-compatible routes, in the shape OpenAI SDKs parse."""

    error: OpenAIErrorInfo


class OpenAIRequest(BaseModel):
    """Any OpenAI request body: berth reads `model` to route it and passes the rest on."""

    model_config = ConfigDict(extra="allow")
    model: str


class OpenAIForm(BaseModel):
    """A multipart OpenAI request (audio transcriptions, translations): `model` routes it,
    and must come before the file; every part is passed on."""

    model_config = ConfigDict(extra="allow")
    model: str
    file: bytes


class BerthModelState(Model):
    endpoint: str
    state: Literal["ready", "sleeping", "starting", "cold", "error"]
    ready_replicas: int


class ModelView(Model):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    berth: BerthModelState


class ModelList(Model):
    object: Literal["list"]
    data: list[ModelView]


class Health(Model):
    status: Literal["ok", "degraded"]
    endpoints: int
    docker: str | None = None  # only when degraded: since when and why the engine is gone
    state_disk: str | None = None  # only when the state disk is under daemon.min_free_disk
    gpus: str | None = None  # only while NVML does not answer: GPU readings unknown


class GpuRef(Model):
    index: int
    uuid: str
    name: str


class ReplicaView(Model):
    id: str
    state: Literal["pending", "starting", "ready", "sleeping", "draining", "stopped",
                   "failed"]
    generation: int
    container_id: str | None
    address: str | None
    gpus: list[GpuRef]
    in_flight: int
    created_at: float
    started_at: float | None
    ready_at: float | None
    last_call_at: float | None
    failures: int
    reason: str | None
    gpu_memory_used_mib: dict[str, int]  # by GPU uuid, from NVML's process list


class StartPhasesView(Model):
    pull_s: float
    create_s: float
    start_s: float
    load_s: float
    total_s: float


class StartsView(Model):
    """Where starts went since berthd started: the last one, each phase's median over the
    last `count` (at most 10)."""

    last: StartPhasesView
    median: StartPhasesView
    count: int


class CacheView(Model):
    volume: str
    path: str
    size_bytes: int | None


class EndpointView(Model):
    name: str
    source: Literal["config", "api"]
    generation: int
    status: Literal["error", "ready", "sleeping", "starting", "pending", "stopping", "idle"]
    error: str | None
    spec: EndpointSpec
    replicas: list[ReplicaView]
    in_flight: int
    queued: int
    starts: StartsView | None
    image: str  # present | pulling (n of m layers) | missing: <reason> | unknown
    cache: CacheView | None = None  # GET of one endpoint with a cache_dir


class EndpointList(Model):
    endpoints: list[EndpointView]


class EndpointDeleted(Model):
    name: str
    deleted: Literal[True]
    replicas_stopping: int


def _optional(info: FieldInfo) -> tuple[Any, FieldInfo]:
    """The same field, with its type and bounds, but not required."""
    return info.annotation, FieldInfo.merge_field_infos(info, default=None,
                                                        default_factory=None)


# PATCH takes any subset of the fields (the result is validated as a whole EndpointSpec).
EndpointPatch: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "EndpointPatch", __config__=ConfigDict(extra="forbid", strict=True),
    **{name: _optional(info) for name, info in EndpointFields.model_fields.items()})


class GpuShare(Model):
    replica: str
    endpoint: str | None
    memory_mib: int


class GpuView(Model):
    index: int
    uuid: str
    name: str
    memory_mib: int
    replica: str | None
    endpoint: str | None
    utilization_pct: int | None
    memory_used_mib: int | None
    temperature_c: int | None
    readings: Literal["ok", "unknown"]
    shares: list[GpuShare]
    shared_mib: int
    lent_to: str | None
    unattributed_mib: int
    healthy: bool
    health_reason: str | None
    cordoned: bool
    cordon_reason: str | None
    cordoned_at: float | None


class GpuList(Model):
    gpus: list[GpuView]


class TokenView(Model):
    id: str
    endpoint: str
    created_at: float
    requests_per_minute: int | None
    tokens_per_day: int | None


class TokenCreated(TokenView):
    token: str


class AuditRow(Model):
    ts: float
    actor: str
    remote: str
    action: str
    target: str
    status: int
    outcome: str


class AuditList(Model):
    audit: list[AuditRow]


class UsageItem(Model):
    """One group: `hour`/`day` (with `start`), `token`, or `endpoint` and `model`."""

    model_config = ConfigDict(extra="allow")
    calls: int
    errors: int
    prompt_tokens: int
    completion_tokens: int


class UsageTotal(Model):
    calls: int
    errors: int
    prompt_tokens: int
    completion_tokens: int


class UsageSummary(Model):
    group_by: Literal["hour", "day", "token", "model"]
    since: int
    until: int | None
    usage: list[UsageItem]
    total: UsageTotal


class TokenList(Model):
    tokens: list[TokenView]


class TokenRevoked(Model):
    id: str
    revoked: Literal[True]


class SecretValue(Model):
    value: str


class SecretView(Model):
    name: str
    created_at: float
    updated_at: float


class SecretList(Model):
    secrets: list[SecretView]


class SecretStored(Model):
    name: str
    stored: Literal[True]


class SecretDeleted(Model):
    name: str
    deleted: Literal[True]


class TaskResult(Model):
    status: int
    content_type: str | None


class TaskCallback(Model):
    url: str
    state: Literal["pending", "delivered", "failed"] | None
    attempts: int
    error: str | None


class TaskView(Model):
    id: str
    endpoint: str
    method: str
    path: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    attempts: int
    replica: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    result: TaskResult | None
    callback: TaskCallback | None
    purged: bool


class TaskList(Model):
    tasks: list[TaskView]


class TaskCount(Model):
    endpoint: str
    status: str
    count: int


class TaskCounts(Model):
    counts: list[TaskCount]


class EventView(Model):
    id: int | None
    ts: float
    kind: str
    endpoint: str | None
    replica: str | None
    message: str


class EventList(Model):
    events: list[EventView]
