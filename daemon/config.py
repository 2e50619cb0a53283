"""Configuration: the TOML file, validated with pydantic, errors named by dotted key path.

The same `EndpointSpec` model validates endpoints from the file and (later) from the API, so
both speak the same field names and give the same errors.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
VOLUME_PATTERN = re.compile(r"^(/[^:]*):(/[^:]*)(:(ro|rw))?$")
SIZE_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)?[bkmgBKMG]?$")
SIZE_SCHEMA: dict[str, Any] = {"pattern": SIZE_PATTERN.pattern}
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
ORIGIN = re.compile(r"^https?://[^/\s]+$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
CAPABILITY = re.compile(r"^(CAP_)?[A-Z_]{2,32}$")
SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 0.001, 30 * 86400.0  # timers beyond 30 days overflow uvloop
MAX_SIZE = 2 ** 53  # bytes: past this a size overflows floats, SQLite's integers and timers


def _whole_number(value: Any) -> Any:
    """JSON and TOML may write a whole number as 2.0; it is still the integer 2."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_whole_number)]


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "512m", "10g" or 4096 (already checked by SIZE_PATTERN);
    one too large to count (hundreds of digits) is MAX_SIZE + 1, refused by `_bounded`."""
    if isinstance(text, int):
        return text
    unit = text[-1].lower() if text[-1].isalpha() else ""
    number = float(text[:len(text) - len(unit)]) * SIZE_UNITS[unit]
    return int(number) if number <= MAX_SIZE else MAX_SIZE + 1


def _bounded(size: int) -> int:
    if not 0 <= size <= MAX_SIZE:
        raise ValueError(f"a size of at most {MAX_SIZE} bytes (2^53)")
    return size


Size = Annotated[int, BeforeValidator(lambda v: parse_size(v)
                                      if isinstance(v, str) and SIZE_PATTERN.match(v) else v),
                 AfterValidator(_bounded)]

# Fields whose change alters what a replica runs: a change to any of them rolls the replicas.
RUNTIME_FIELDS = frozenset(
    {"image", "command", "args", "port", "env", "secrets", "volumes", "shm_size", "cpus",
     "memory", "gpus", "gpu_type", "readiness", "liveness", "pids_limit", "cap_add", "user",
     "cache_dir", "gpu_memory"}
)
MIB = 1024 ** 2


class Strict(BaseModel):
    """Base for config models: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Readiness(Strict):
    path: str = Field("/health", pattern=r"^/")
    period_s: float = Field(1.0, gt=0, le=3600)
    timeout_s: float = Field(2.0, gt=0, le=3600)


class Liveness(Strict):
    path: str | None = Field(None, pattern=r"^/")  # None: same as readiness.path
    period_s: float = Field(10.0, gt=0, le=3600)
    timeout_s: float = Field(2.0, gt=0, le=3600)
    failure_threshold: Int = Field(3, ge=1, le=100)


CALL = r"^(GET|POST|PUT|PATCH|DELETE) /\S*$"


class SleepTier(Strict):
    """A model server's sleep and wake calls (vLLM's: POST /sleep?level=1, POST /wake_up)."""

    after_s: float = Field(gt=0, le=MAX_TIMEOUT_S)  # idle this long: put to sleep
    enter: str = Field("POST /sleep?level=1", pattern=CALL)
    wake: str = Field("POST /wake_up", pattern=CALL)
    wake_timeout_s: float = Field(60.0, gt=0, le=MAX_TIMEOUT_S)


class EndpointFields(Strict):
    """Every endpoint field but the name, with its default (the `[defaults]` table too)."""

    image: str = Field(min_length=1)
    command: list[str] | None = None
    args: list[str] | None = None
    port: Int = Field(8080, ge=1, le=65535)
    env: dict[str, str] = Field(default_factory=dict,
                                json_schema_extra={"propertyNames": {"pattern": ENV_NAME}})
    secrets: list[str] = Field(default_factory=list)
    volumes: list[str] = Field(default_factory=list, json_schema_extra={
        "items": {"type": "string", "pattern": VOLUME_PATTERN.pattern}})
    shm_size: str | None = Field(None, json_schema_extra=SIZE_SCHEMA)
    cpus: float | None = Field(None, gt=0, le=1024)
    memory: str | None = Field(None, json_schema_extra=SIZE_SCHEMA)
    gpus: Int = Field(0, ge=0, le=64)
    gpu_type: str | None = None
    # With gpus = 1: a share of one GPU's memory (e.g. "20g"); replicas are packed by it.
    gpu_memory: str | None = Field(None, json_schema_extra=SIZE_SCHEMA)
    min_replicas: Int = Field(0, ge=0, le=64)
    max_replicas: Int = Field(1, ge=1, le=64)
    concurrency: Int = Field(1, ge=1, le=10000)
    idle_timeout_s: float = Field(300.0, ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)
    request_timeout_s: float = Field(600.0, ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)
    async_timeout_s: float = Field(3600.0, ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)
    startup_timeout_s: float = Field(600.0, ge=MIN_TIMEOUT_S, le=MAX_TIMEOUT_S)
    queue_limit: Int = Field(100, ge=0, le=1_000_000)
    readiness: Readiness = Field(default_factory=Readiness)  # type: ignore[arg-type]
    liveness: Liveness = Field(default_factory=Liveness)  # type: ignore[arg-type]
    public: bool = False
    priority: Int = Field(0, ge=-1000, le=1000)
    labels: dict[str, str] = Field(default_factory=dict)
    # Model names served (OpenAI routing by `model`), unique across endpoints; None: [name].
    models: list[str] | None = Field(None, min_length=1, max_length=64, json_schema_extra={
        "items": {"type": "string", "pattern": MODEL_NAME.pattern}})
    # The name the model server expects: berth rewrites `model` to it and back.
    upstream_model: str | None = Field(None, pattern=r"^\S{1,256}$")
    # A streamed OpenAI call waiting this long for a slot gets 200 and SSE comments this
    # often, so idle proxies do not cut it (0: off).
    stream_keepalive_s: float = Field(10.0, ge=0, le=3600)
    # A path inside the container (e.g. /root/.cache) where a named volume of the endpoint's
    # own is mounted: compile and download caches survive replica replacement and restarts.
    cache_dir: str | None = Field(None, pattern=r"^/[^:\s]*$")
    # Idle replicas sleep (weights off the GPU, the container kept) and wake in seconds.
    sleep: SleepTier | None = None

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            if not MODEL_NAME.match(item):
                raise ValueError(f"{item!r} is not a model name (letters, digits and . _ : / @ "
                                 "-, up to 128)")
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a model name is listed twice")
        return value
    async_queue_limit: Int = Field(1000, ge=0, le=10_000_000)
    async_queue_bytes: str = Field("10g", json_schema_extra=SIZE_SCHEMA)
    pids_limit: Int = Field(4096, ge=16, le=4_194_304)
    cap_add: list[str] = Field(default_factory=list, json_schema_extra={
        "items": {"type": "string", "pattern": CAPABILITY.pattern}})
    user: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$")

    @field_validator("cap_add")
    @classmethod
    def _capabilities(cls, value: list[str]) -> list[str]:
        for item in value:
            if not CAPABILITY.match(item):
                raise ValueError(f"{item!r} is not a capability name such as \"SYS_NICE\"")
        return value

    @property
    def async_queue_max_bytes(self) -> int:
        return parse_size(self.async_queue_bytes)

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: list[str]) -> list[str]:
        for item in value:
            if not VOLUME_PATTERN.match(item):
                raise ValueError(f"{item!r} is not \"/host/path:/container/path[:ro]\"")
        return value

    @property
    def gpu_memory_mib(self) -> int | None:
        """The GPU memory share in MiB (rounded up), None for whole GPUs."""
        return None if self.gpu_memory is None else -(-parse_size(self.gpu_memory) // MIB)

    @field_validator("shm_size", "memory", "async_queue_bytes", "gpu_memory")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and not SIZE_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a size such as \"512m\" or \"16g\"")
        if value is not None:
            _bounded(parse_size(value))
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.match(ENV_NAME, key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return value

    @property
    def liveness_path(self) -> str:
        return self.liveness.path or self.readiness.path


class EndpointSpec(EndpointFields):
    """One endpoint, as the file, the API and the store describe it."""

    name: str = Field(pattern=NAME_PATTERN)

    @property
    def model_names(self) -> list[str]:
        """The models this endpoint serves: `models`, else its own name."""
        return list(self.models) if self.models is not None else [self.name]

    def serves(self, model: str) -> bool:
        """Whether `model` is one of model_names (without building the list)."""
        return model in self.models if self.models is not None else model == self.name

    @property
    def first_model(self) -> str:
        """model_names[0] without a list: what a call that names no model is counted under."""
        return self.models[0] if self.models is not None else self.name

    def runtime_view(self) -> dict[str, Any]:
        """The part of the spec that decides what a replica runs."""
        return self.model_dump(include=set(RUNTIME_FIELDS))


class DaemonSettings(Strict):
    listen: str = Field("127.0.0.1:8080", pattern=r"^.+:[0-9]{1,5}$")
    state_dir: str = "/var/lib/berth"
    admin_token_file: str | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_body_bytes: Int = Field(100 * 1024 * 1024, ge=1)
    max_async_body_bytes: Int = Field(1024 * 1024 * 1024, ge=1)
    shutdown_grace_s: float = Field(30.0, ge=0)
    stop_replicas_on_exit: bool = False
    reconcile_interval_s: float = Field(1.0, gt=0, le=60)
    task_max_attempts: Int = Field(3, ge=1, le=100)
    task_retry_backoff_s: float = Field(1.0, gt=0)
    result_ttl_s: float = Field(86400.0, gt=0)
    purge_interval_s: float = Field(60.0, gt=0, le=MAX_TIMEOUT_S)
    callback_secret_file: str | None = None
    callback_retry_s: float = Field(3600.0, ge=0)
    callback_backoff_s: float = Field(1.0, gt=0)
    # Networks (CIDRs) and host names callbacks may reach although private or local.
    callback_allow: list[str] = Field(default_factory=list)
    # Host names (besides the listener's literal address) the API answers to.
    allowed_hosts: list[str] = Field(default_factory=lambda: ["localhost"])
    # Origins (scheme://host[:port]) besides berthd's own whose browser requests are let in.
    allowed_origins: list[str] = Field(default_factory=list)
    # Host paths endpoints may mount; empty: any.
    allowed_volume_prefixes: list[str] = Field(default_factory=list)
    # Below this much free space in state_dir new async tasks are refused (507).
    min_free_disk: Size = Field(2 * 1024 ** 3, ge=0)
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    # The body of an OpenAI call is read whole before its model is known: it must come in time.
    body_timeout_s: float = Field(60.0, gt=0, le=3600)
    keepalive_timeout_s: float = Field(15.0, gt=0, le=3600)
    max_connections: Int = Field(4096, ge=1)
    max_connections_per_client: Int = Field(256, ge=1)
    # Calls and model tokens per token, endpoint, model and hour (GET /v1/usage), written to
    # SQLite every usage_flush_s; tokens_per_day limits need it.
    usage_accounting: bool = True
    usage_flush_s: float = Field(1.0, gt=0, le=60)
    # Bounded state: rows older than these go (finished tasks once their results are purged).
    events_ttl_s: float = Field(30 * 86400.0, gt=0)
    audit_ttl_s: float = Field(365 * 86400.0, gt=0)
    finished_tasks_ttl_s: float = Field(30 * 86400.0, gt=0)
    prune_interval_s: float = Field(3600.0, gt=0, le=MAX_TIMEOUT_S)

    @field_validator("callback_allow")
    @classmethod
    def _networks_or_hosts(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                if not HOST_NAME.match(item):
                    raise ValueError(f"{item!r} is neither a CIDR nor a host name") from None
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for item in value:
            if not ORIGIN.match(item):
                raise ValueError(f"{item!r} is not an origin such as \"https://host:8443\"")
        return [v.lower() for v in value]

    @field_validator("allowed_volume_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.startswith("/"):
                raise ValueError(f"{item!r} is not an absolute path")
        return value


class DockerSettings(Strict):
    host: str | None = None  # None: DOCKER_HOST or the default socket
    network: str = Field("berth", min_length=1)
    gpu_mode: Literal["auto", "nvidia", "cdi", "env"] = "auto"
    stop_timeout_s: float = Field(10.0, ge=0)
    pull: bool = True
    # Replicas may open connections beyond their own endpoint's network (model downloads).
    # false: each endpoint's network is internal (no route out of the box).
    egress: bool = True
    # Each endpoint's network gets the first free /24 of this range.
    subnet_pool: str = Field("10.210.0.0/16", pattern=r"^[0-9.]+/[0-9]{1,2}$")

    @field_validator("subnet_pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        try:
            network = ipaddress.IPv4Network(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not an IPv4 network: {exc}") from None
        if network.prefixlen > 24:
            raise ValueError(f"{value!r} holds no /24; use /24 or wider")
        return value


class GpuDevice(Strict):
    name: str = Field(min_length=1)
    memory_mib: Int = Field(ge=1)
    uuid: str | None = None
    # GPUs of one group are NVLink peers (static source; NVML tells it by itself).
    nvlink_group: str | None = Field(None, min_length=1, max_length=64)
    # A MIG device rather than a whole GPU (static source; NVML tells it by itself).
    mig: bool = False


class GpuSettings(Strict):
    source: Literal["nvml", "static", "none"] = "nvml"
    devices: list[GpuDevice] = Field(default_factory=list)
    sample_interval_s: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S)
    # Memory of each GPU that shared replicas (gpu_memory) never get: the driver's and CUDA
    # contexts' own.
    reserve_memory: str = Field("1g", json_schema_extra=SIZE_SCHEMA)

    @field_validator("reserve_memory")
    @classmethod
    def _reserve(cls, value: str) -> str:
        if not SIZE_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a size such as \"512m\" or \"1g\"")
        return value

    @property
    def reserve_mib(self) -> int:
        return -(-parse_size(self.reserve_memory) // MIB)


class Config(Strict):
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)  # type: ignore[arg-type]
    docker: DockerSettings = Field(default_factory=DockerSettings)  # type: ignore[arg-type]
    gpu: GpuSettings = Field(default_factory=GpuSettings)  # type: ignore[arg-type]
    endpoints: dict[str, EndpointSpec] = Field(default_factory=dict)


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A config that does not validate; `issues` names every wrong key by its dotted path."""

    def __init__(self, issues: list[ConfigIssue], partial: Config | None = None) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues
        self.partial = partial  # what did validate, so later checks can still name problems


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def issues_from_validation(error: ValidationError,
                           prefix: tuple[Any, ...] = ()) -> list[ConfigIssue]:
    """Turn pydantic's errors into dotted-path issues, in words a sysadmin reads."""
    issues = []
    for err in error.errors():
        path = ".".join(str(p) for p in (*prefix, *err["loc"]))
        message = _MESSAGES.get(err["type"], err["msg"])
        if err["type"] not in _MESSAGES and "input" in err and not isinstance(err["input"], dict):
            message = f"{message} (got {err['input']!r})"
        issues.append(ConfigIssue(path, message))
    return issues


def parse_endpoint(name: str, fields: Any, defaults: dict[str, Any],
                   prefix: tuple[str, ...]) -> tuple[EndpointSpec | None, list[ConfigIssue]]:
    """Validate one endpoint table merged over the defaults; None and issues when it fails."""
    if not isinstance(fields, dict):
        return None, [ConfigIssue(".".join(prefix), "must be a table of endpoint fields")]
    merged = {**defaults, **fields, "name": name}
    try:
        spec = EndpointSpec.model_validate(merged)
    except ValidationError as exc:
        return None, issues_from_validation(exc, prefix)
    return spec, check_endpoint(spec, ".".join(prefix))


def check_endpoint(spec: EndpointSpec, path: str) -> list[ConfigIssue]:
    """Checks across fields that pydantic field validators cannot make alone."""
    if spec.min_replicas > spec.max_replicas:
        return [ConfigIssue(f"{path}.min_replicas",
                            f"min_replicas ({spec.min_replicas}) is greater than "
                            f"max_replicas ({spec.max_replicas})")]
    if spec.gpu_memory is not None and spec.gpus != 1:
        return [ConfigIssue(f"{path}.gpu_memory",
                            f"gpu_memory shares one GPU: use it with gpus = 1 (not {spec.gpus})")]
    if spec.gpu_memory_mib == 0:
        return [ConfigIssue(f"{path}.gpu_memory", "gpu_memory must be more than 0")]
    if spec.sleep is not None and spec.sleep.after_s >= spec.idle_timeout_s:
        return [ConfigIssue(f"{path}.sleep.after_s",
                            f"sleep.after_s ({spec.sleep.after_s:g}) must be below "
                            f"idle_timeout_s ({spec.idle_timeout_s:g})")]
    return []


def model_clashes(specs: Sequence[EndpointSpec]) -> dict[str, tuple[str, str]]:
    """Model names served by two endpoints: model -> (first endpoint, second endpoint)."""
    owner: dict[str, str] = {}
    clashes: dict[str, tuple[str, str]] = {}
    for spec in sorted(specs, key=lambda s: s.name):
        for model in spec.model_names:
            if model in owner and owner[model] != spec.name:
                clashes.setdefault(model, (owner[model], spec.name))
            owner.setdefault(model, spec.name)
    return clashes


def model_issues(specs: Sequence[EndpointSpec]) -> list[ConfigIssue]:
    """Config issues for models that two endpoints both serve, at the second one's path."""
    return [ConfigIssue(f"endpoints.{second}.models",
                        f"model {model!r} is also served by endpoint {first}")
            for model, (first, second) in model_clashes(specs).items()]


def volume_issues(spec: EndpointSpec, prefixes: Sequence[str] | tuple[str, ...],
                  path: str) -> list[ConfigIssue]:
    """Volumes whose host path lies outside daemon.allowed_volume_prefixes (none: any)."""
    if not prefixes:
        return []
    issues = []
    for i, volume in enumerate(spec.volumes):
        host = posixpath.normpath(volume.split(":", 1)[0])
        if not any(host == p.rstrip("/") or host.startswith(p.rstrip("/") + "/")
                   or p.rstrip("/") == "" for p in prefixes):
            issues.append(ConfigIssue(f"{path}.volumes.{i}".lstrip("."),
                                      f"host path {host} is outside "
                                      f"daemon.allowed_volume_prefixes ({', '.join(prefixes)})"))
    return issues


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    data = dict(data)
    raw_endpoints = data.pop("endpoints", {})
    defaults, issues = _parse_defaults(data.pop("defaults", {}))
    try:
        config: Config | None = Config.model_validate(data)
    except ValidationError as exc:
        issues += issues_from_validation(exc)
        config = None
    endpoints: dict[str, EndpointSpec] = {}
    if not isinstance(raw_endpoints, dict):
        issues.append(ConfigIssue("endpoints", "must be a table of [endpoints.NAME] tables"))
        raw_endpoints = {}
    for name, fields in raw_endpoints.items():
        spec, found = parse_endpoint(name, fields, defaults, ("endpoints", name))
        issues += found
        if spec is not None:
            endpoints[name] = spec
    if config is not None:
        for name, spec in endpoints.items():
            issues += volume_issues(spec, config.daemon.allowed_volume_prefixes,
                                    f"endpoints.{name}")
    issues += model_issues(list(endpoints.values()))
    if config is not None and not issues:
        return config.model_copy(update={"endpoints": endpoints})
    raise ConfigError(issues, _partial(config, data, endpoints))


def _parse_defaults(raw: Any) -> tuple[dict[str, Any], list[ConfigIssue]]:
    if not isinstance(raw, dict):
        return {}, [ConfigIssue("defaults", "must be a table of endpoint fields")]
    issues = [ConfigIssue(f"defaults.{k}", "unknown key")
              for k in raw if k not in EndpointFields.model_fields]
    return {k: v for k, v in raw.items() if k in EndpointFields.model_fields}, issues


def _partial(config: Config | None, data: dict[str, Any],
             endpoints: dict[str, EndpointSpec]) -> Config | None:
    """The parts that did validate (GPU section and endpoints), for checks that need them."""
    if config is None:
        try:
            config = Config(gpu=GpuSettings.model_validate(data.get("gpu", {})))
        except ValidationError:
            return None
    return config.model_copy(update={"endpoints": endpoints})


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; ConfigError for anything wrong with it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {path}: {exc.strerror}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"{path} is not UTF-8 text: byte {exc.start} "
                                           f"is {exc.object[exc.start:exc.start + 1]!r}")]
                          ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"{path} is not valid TOML: {exc}")]) from exc
    except RecursionError:
        raise ConfigError([ConfigIssue("", f"{path} nests too deeply")]) from None
    return parse_config(data)


def gpu_shortage(spec: EndpointSpec, gpus: Sequence[Any], reserve_mib: int = 1024
                 ) -> str | None:
    """Why the box can never hold one replica of `spec` (too few GPUs of its gpu_type, or
    none with room for its gpu_memory beside gpu.reserve_memory)."""
    kind = (spec.gpu_type or "").lower()
    ask = spec.gpu_memory_mib
    if ask and spec.gpus == 1:
        room = max((g.memory_mib - reserve_mib for g in gpus if kind in g.name.lower()),
                   default=0)
        if room < ask:
            return (f"gpu_memory asks for {ask} MiB but the largest GPU"
                    f"{' matching ' + repr(spec.gpu_type) if spec.gpu_type else ''} has "
                    f"{max(room, 0)} MiB beside gpu.reserve_memory")
    matching = [g for g in gpus if kind in g.name.lower()]
    have = sum(1 for g in matching if not (getattr(g, "mig", False) and spec.gpus > 1))
    if have >= spec.gpus:
        return None
    if spec.gpus > 1 and any(getattr(g, "mig", False) for g in matching):
        return (f"asks for {spec.gpus} GPUs but MIG devices go one per replica (CUDA sees one "
                f"MIG device per process); this box has {have} whole GPU(s)"
                + (f" matching gpu_type {spec.gpu_type!r}" if spec.gpu_type else ""))
    what = "GPU" if have == 1 else "GPUs"
    if spec.gpu_type:
        what += f" matching gpu_type {spec.gpu_type!r}"
    return f"asks for {spec.gpus} but this box has {have} {what}"


def gpu_issues(endpoints: dict[str, EndpointSpec], gpus: Sequence[Any],
               reserve_mib: int = 1024) -> list[ConfigIssue]:
    """Endpoints asking for more GPUs (of their gpu_type) than the box has at all."""
    issues = []
    for name, spec in endpoints.items():
        shortage = gpu_shortage(spec, gpus, reserve_mib)
        if shortage is not None:
            field = "gpu_memory" if shortage.startswith("gpu_memory") else "gpus"
            issues.append(ConfigIssue(f"endpoints.{name}.{field}", shortage))
    return issues
