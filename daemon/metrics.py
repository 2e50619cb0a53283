"""GET /metrics: Prometheus text for scrapers.

Counters and a histogram of data-plane calls are kept as calls end; everything else (replicas,
waiting calls, GPUs, tasks) is read from live state at scrape time, so a removed endpoint or a
freed GPU disappears from the next scrape instead of lingering as a stale series.
"""

from __future__ import annotations

import bisect
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from berth.daemon.metering import ModelTokens
from berth.gpu import GpuAllocator, GpuMarkKind, GpuSample
from berth.gpu.inventory import attribute
from berth.scheduler.endpoint import StartPhases
from berth.scheduler.pool import EndpointPool, replica_containers
from berth.scheduler.reconciler import Reconciler
from berth.scheduler.replica import ReplicaState
from berth.store.records import EventRecord

# Call durations span sub-millisecond echoes to hour-long generations.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600, 1800, 3600)
# Starts span the demo's tenth of a second to a large model's ten minutes.
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
MIB = 1024 ** 2
__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]
FAILURE_KINDS = frozenset({"crash", "start_failed"})  # event kinds of a replica that failed


@dataclass
class LiveState:
    """Gauges read at scrape time; filled by `Metrics.refresh`."""

    families: list[Metric] = field(default_factory=list)


class LiveCollector(Collector):
    def __init__(self, state: LiveState, calls: CallCounts) -> None:
        self.state = state
        self.calls = calls

    def collect(self) -> Iterator[Metric]:
        yield from self.calls.families()
        yield from self.state.families


class CallCounts:
    """Data-plane calls by endpoint and status, and their durations, as plain numbers: one
    dict update and one list update per call (prometheus_client's labelled children take a
    lock and several calls per update, on every model call). Read at scrape time."""

    def __init__(self) -> None:
        self.by_status: dict[tuple[str, int], int] = {}
        # per endpoint: a count per bucket (the last is +Inf, not cumulative) and the sum
        self.durations: dict[str, tuple[list[int], list[float]]] = {}

    def ended(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        self.by_status[key] = self.by_status.get(key, 0) + 1
        histogram = self.durations.get(endpoint)
        if histogram is None:
            histogram = self.durations[endpoint] = ([0] * (len(DURATION_BUCKETS) + 1), [0.0])
        histogram[0][bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        histogram[1][0] += seconds

    def families(self) -> list[Metric]:
        calls = CounterMetricFamily("berth_calls", "Data-plane calls that ended, by answer "
                                    "status", labels=("endpoint", "code"))
        for (endpoint, status), count in sorted(self.by_status.items()):
            calls.add_metric((endpoint, str(status)), count)
        durations = HistogramMetricFamily("berth_call_duration_seconds", "Time from a call's "
                                          "arrival to its last byte", labels=("endpoint",))
        bounds = [*(repr(float(b)) for b in DURATION_BUCKETS), "+Inf"]  # as prometheus_client
        for endpoint, (counts, total) in sorted(self.durations.items()):
            cumulative = [sum(counts[:i + 1]) for i in range(len(counts))]
            durations.add_metric((endpoint,), list(zip(bounds, cumulative, strict=True)),
                                 total[0])
        return [calls, durations]


class Metrics:
    """berth's Prometheus registry: call counters fed by the data plane, live gauges at scrape.

    One instance per app (no global registry), so tests and several apps in one process each
    count their own calls.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = CallCounts()
        self.start_seconds = Histogram(
            "berth_replica_start_seconds", "Where replica starts go: pull, create, start "
            "(until the container runs), load (until readiness passes), total; and wakes from "
            "sleep (wake)",
            ("endpoint", "phase"), buckets=START_BUCKETS, registry=self.registry)
        self.failures = Counter(
            "berth_replica_failures", "Replicas that crashed or failed to start (crash loops "
            "show as a rising rate)", ("endpoint", "kind"), registry=self.registry)
        self.live = LiveState()
        self.registry.register(LiveCollector(self.live, self.calls))
        # every model call ends here: the bound method, looked up once
        self.call_ended = self.calls.ended

    def event_observed(self, event: EventRecord) -> None:
        if event.kind in FAILURE_KINDS and event.endpoint is not None:
            self.failures.labels(event.endpoint, event.kind).inc()

    def wake_observed(self, endpoint: str, seconds: float) -> None:
        self.start_seconds.labels(endpoint, "wake").observe(seconds)

    def start_observed(self, endpoint: str, phases: StartPhases) -> None:
        for phase in ("pull", "create", "start", "load", "total"):
            self.start_seconds.labels(endpoint, phase).observe(getattr(phases, f"{phase}_s"))


    async def refresh(self, reconciler: Reconciler, allocator: GpuAllocator,
                      samples: dict[str, GpuSample],
                      model_tokens: dict[tuple[str, str], ModelTokens],
                      min_free_disk: int = 0) -> None:
        store = reconciler.store  # reconciler: the scrape's one source
        tasks = await store.tasks.counts()
        self.live.families = [*endpoint_families(reconciler), *gpu_families(allocator, samples),
                              *memory_families(samples, reconciler.live_pools(), allocator),
                              task_family(tasks), token_family(model_tokens),
                              *state_families(store.retention.size(),
                                              shutil.disk_usage(store.path.parent).free,
                                              min_free_disk)]

    def render(self) -> bytes:
        return generate_latest(self.registry)


def state_families(db_bytes: int, free_bytes: int, min_free: int) -> list[Metric]:
    db = GaugeMetricFamily("berth_state_db_bytes", "Size of the state database and its WAL")
    db.add_metric((), db_bytes)
    free = GaugeMetricFamily("berth_state_disk_free_bytes",
                             "Free space on the state directory's disk")
    free.add_metric((), free_bytes)
    floor = GaugeMetricFamily("berth_state_disk_min_free_bytes", "daemon.min_free_disk: under "
                              "it new async tasks are refused (507)")
    floor.add_metric((), min_free)
    return [db, free, floor]


def token_family(model_tokens: dict[tuple[str, str], ModelTokens]) -> Metric:
    """The usage ledger's totals since start (counted there as calls end, read here)."""
    family = CounterMetricFamily("berth_model_tokens", "Model tokens of answers, from their "
                                 "OpenAI usage object", labels=("endpoint", "model", "kind"))
    for (endpoint, model), totals in sorted(model_tokens.items()):
        family.add_metric((endpoint, model, "prompt"), totals.prompt)
        family.add_metric((endpoint, model, "completion"), totals.completion)
    return family


def endpoint_families(reconciler: Reconciler) -> list[Metric]:
    replicas = GaugeMetricFamily("berth_replicas", "Replicas by state", labels=("endpoint",
                                                                               "state"))
    in_flight = GaugeMetricFamily("berth_calls_in_flight", "Calls and tasks running on replicas",
                                  labels=("endpoint",))
    waiting = GaugeMetricFamily("berth_calls_waiting", "Calls waiting for a replica slot",
                                labels=("endpoint",))
    error = GaugeMetricFamily("berth_endpoint_error", "1 while the endpoint is in an error "
                              "state (missing image or secret)", labels=("endpoint",))
    for pool in reconciler.all_pools():
        if pool.removed:
            continue
        for state in (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY,
                      ReplicaState.SLEEPING, ReplicaState.DRAINING):
            replicas.add_metric((pool.name, state.value), pool.count(state))
        in_flight.add_metric((pool.name,), sum(r.in_flight for r in pool.replicas.values()))
        waiting.add_metric((pool.name,), pool.waiting)
        error.add_metric((pool.name,), 1 if pool.error else 0)
    return [replicas, in_flight, waiting, error]


def memory_families(samples: dict[str, GpuSample], pools: list[EndpointPool],
                    allocator: GpuAllocator) -> list[Metric]:
    """GPU memory by replica (NVML's processes mapped to containers) and by nobody."""
    used, nobody = attribute(samples, replica_containers(pools))
    endpoint_of = {r.id: p.name for p in pools for r in p.replicas.values()}
    index = {g.uuid: g for g in allocator.gpus}
    by_replica = GaugeMetricFamily("berth_replica_gpu_memory_bytes", "GPU memory the "
                                   "replica's processes use, when sampled",
                                   labels=("endpoint", "replica", "gpu"))
    for replica, per_gpu in used.items():
        for uuid, mib in per_gpu.items():
            by_replica.add_metric((endpoint_of[replica], replica, str(index[uuid].index)),
                                  mib * MIB)
    stray = GaugeMetricFamily("berth_gpu_unattributed_memory_bytes", "GPU memory used by "
                              "processes of no replica, when sampled",
                              labels=("gpu", "uuid", "name"))
    for uuid, mib in nobody.items():
        stray.add_metric((str(index[uuid].index), uuid, index[uuid].name), mib * MIB)
    return [by_replica, stray]


def gpu_families(allocator: GpuAllocator, samples: dict[str, GpuSample]) -> list[Metric]:
    labels = ("gpu", "uuid", "name")
    held = GaugeMetricFamily("berth_gpu_allocated", "1 while a replica holds the GPU",
                             labels=labels)
    util = GaugeMetricFamily("berth_gpu_utilization_ratio", "GPU busy ratio, 0 to 1, when sampled",
                             labels=labels)
    memory = GaugeMetricFamily("berth_gpu_memory_used_bytes", "GPU memory in use, when sampled",
                               labels=labels)
    temp = GaugeMetricFamily("berth_gpu_temperature_celsius", "GPU temperature, when sampled",
                             labels=labels)
    healthy = GaugeMetricFamily("berth_gpu_healthy", "0 while berth holds the GPU for sick",
                                labels=labels)
    cordoned = GaugeMetricFamily("berth_gpu_cordoned", "1 while an admin keeps the GPU out of "
                                 "service", labels=labels)
    owners, shares = allocator.owners(), allocator.shares()
    for gpu in allocator.gpus:
        key = (str(gpu.index), gpu.uuid, gpu.name)
        held.add_metric(key, 1 if gpu.uuid in owners or gpu.uuid in shares else 0)
        marks = allocator.marks(gpu.uuid)
        healthy.add_metric(key, 0 if GpuMarkKind.UNHEALTHY in marks else 1)
        cordoned.add_metric(key, 1 if GpuMarkKind.CORDONED in marks else 0)
        sample = samples.get(gpu.uuid, GpuSample())
        if sample.utilization_pct is not None:
            util.add_metric(key, sample.utilization_pct / 100)
        if sample.memory_used_mib is not None:
            memory.add_metric(key, sample.memory_used_mib * MIB)
        if sample.temperature_c is not None:
            temp.add_metric(key, sample.temperature_c)
    return [held, healthy, cordoned, util, memory, temp]


def task_family(counts: list[tuple[str, str, int]]) -> Metric:
    tasks = GaugeMetricFamily("berth_tasks", "Async tasks kept in the store, by status",
                              labels=("endpoint", "status"))
    for endpoint, status, n in counts:
        tasks.add_metric((endpoint, status), n)
    return tasks

