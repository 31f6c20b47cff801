"""Prometheus metrics of the serving path, recorded through Ray Serve's metrics API.

Ray's metrics agent exports a metric named `lr_x` as `ray_lr_x`; a Counter as
`ray_lr_x_total`, a Histogram as `ray_lr_x_bucket`, `_sum` and `_count` (see
`MetricSpec.exported_names`). Ray metric objects must be created inside the worker that
records them, so each process creates its own on first use.

Tags stay low-cardinality: tenant names, composition modes, status codes, rejection
reasons and composer replica ids; never request ids or prompt text. Adapter versions are
tags of the lr_adapter_* metrics only within a bound (VersionLabels).
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable

from services.serving.pipeline import UNPLANNED  # the request failed before a composition was chosen

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
EXPORT_PREFIX = "ray_"
NO_TENANT = "anonymous"  # auth disabled, or rejected before the API key named a tenant
COMPOSITIONS = frozenset({"selection", "mixture", "fusion", "none", UNPLANNED})
_REASON = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class MetricValueError(ValueError):
    """A value or tag that a metric refuses; the message names the metric and the value."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # COUNTER, GAUGE or HISTOGRAM
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()  # histogram bucket upper bounds; Ray wants them > 0

    def exported_names(self) -> tuple[str, ...]:
        """The series names a Prometheus scrape of Ray's metrics port shows for this metric."""
        base = EXPORT_PREFIX + self.name
        if self.kind == COUNTER:
            return (base + "_total",)
        if self.kind == HISTOGRAM:
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCORES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)  # cosine; lower values land in le=0.1
ADAPTERS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0)  # le=0.5 counts base-model requests
BATCH_ROWS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
TOKENS_PER_S = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)

SPECS: dict[str, MetricSpec] = {s.name: s for s in (
    MetricSpec("lr_retrieval_seconds", HISTOGRAM, "Time to embed a prompt and search the adapter index.",
               boundaries=SECONDS),
    MetricSpec("lr_retrieval_top1_score", HISTOGRAM, "Cosine similarity of the best adapter retrieved for a prompt.",
               boundaries=SCORES),
    MetricSpec("lr_retrieval_empty", COUNTER, "Retrievals that returned no adapter."),
    MetricSpec("lr_embedding_cache_hits", COUNTER, "Prompts whose embedding a retriever replica had cached."),
    MetricSpec("lr_embedding_cache_misses", COUNTER, "Prompts a retriever replica had to embed."),
    MetricSpec("lr_requests", COUNTER, "Completion requests answered, by tenant, composition mode and HTTP status.",
               ("tenant", "composition", "status")),
    MetricSpec("lr_adapters_per_request", HISTOGRAM, "Adapters composed for one request (0: base model).",
               boundaries=ADAPTERS),
    MetricSpec("lr_rejections", COUNTER, "Requests refused at the door, by tenant and reason.", ("tenant", "reason")),
    MetricSpec("lr_batch_size", HISTOGRAM, "Rows running in one decode step.", boundaries=BATCH_ROWS),
    MetricSpec("lr_generated_tokens", COUNTER, "New tokens generated."),
    MetricSpec("lr_batch_tokens_per_second", HISTOGRAM, "New tokens per second of one decode step, prompt chunks included.",
               boundaries=TOKENS_PER_S),
    MetricSpec("lr_ttft_seconds", HISTOGRAM, "Time from request arrival to its first generated token.",
               boundaries=SECONDS),
    MetricSpec("lr_pool_hits", COUNTER, "Adapter acquisitions served from a device slot.", ("composer",)),
    MetricSpec("lr_pool_misses", COUNTER, "Adapter acquisitions that needed a load to the device.", ("composer",)),
    MetricSpec("lr_pool_loads", COUNTER, "Adapters written into a device slot.", ("composer",)),
    MetricSpec("lr_pool_evictions", COUNTER, "Adapters evicted from a device slot.", ("composer",)),
    MetricSpec("lr_pool_load_seconds", COUNTER, "Seconds spent loading adapters into device slots.", ("composer",)),
    MetricSpec("lr_pool_cpu_evictions", COUNTER, "Adapters dropped from the CPU tier.", ("composer",)),
    MetricSpec("lr_pool_disk_reloads", COUNTER, "Adapters read again from the store after a CPU-tier eviction.",
               ("composer",)),
    MetricSpec("lr_prefix_hit_tokens", COUNTER, "Prompt tokens whose keys were copied from the prefix cache.",
               ("composer",)),
    MetricSpec("lr_prefix_miss_tokens", COUNTER, "Prompt tokens computed (not found in the prefix cache).",
               ("composer",)),
    MetricSpec("lr_adapter_requests", COUNTER, "Requests that used an adapter version, by version, its role "
               "(active, canary, or named: another version asked for by name) and HTTP status.",
               ("adapter", "version", "role", "status")),
    MetricSpec("lr_adapter_latency_seconds", HISTOGRAM, "Wall time of requests that used an adapter version.",
               ("adapter", "version", "role"), SECONDS),
    MetricSpec("lr_adapter_retrieval_score", HISTOGRAM, "Retrieval score of an adapter version when retrieval "
               "chose it.", ("adapter", "version", "role"), SCORES),
    MetricSpec("lr_pool_resident", GAUGE, "Adapters resident in device slots.", ("composer",)),
    MetricSpec("lr_pool_device_slots", GAUGE, "Device slots of the adapter pool.", ("composer",)),
)}

# AdapterPool.stats() field -> metric; the required fields are the pool's core counters.
POOL_COUNTERS = {"hits": "lr_pool_hits", "misses": "lr_pool_misses", "loads": "lr_pool_loads",
                 "evictions": "lr_pool_evictions", "load_seconds": "lr_pool_load_seconds",
                 "cpu_evictions": "lr_pool_cpu_evictions", "disk_reloads": "lr_pool_disk_reloads",
                 "prefix_hit_tokens": "lr_prefix_hit_tokens", "prefix_miss_tokens": "lr_prefix_miss_tokens"}
REQUIRED_POOL_COUNTERS = ("hits", "misses", "loads", "evictions", "load_seconds")
POOL_GAUGES = {"resident": "lr_pool_resident", "device_slots": "lr_pool_device_slots"}


def ray_metric(spec: MetricSpec):
    """The Ray Serve metric object for `spec` (adds deployment/replica/application tags inside a replica)."""
    from ray.serve import metrics

    if spec.kind == COUNTER:
        return metrics.Counter(spec.name, spec.description, spec.tag_keys)
    if spec.kind == GAUGE:
        return metrics.Gauge(spec.name, spec.description, spec.tag_keys)
    return metrics.Histogram(spec.name, spec.description, list(spec.boundaries), spec.tag_keys)


class CumulativeDeltas:
    """Turns cumulative counter snapshots into increments, per source and field.

    A value below the last one means the source restarted from zero, so all of it is new."""

    def __init__(self):
        self._last: dict[tuple[str, str], float] = {}

    def delta(self, source: str, field: str, value: float) -> float:
        last = self._last.get((source, field), 0.0)
        self._last[(source, field)] = value
        return value - last if value >= last else value


class _State:
    """The metric objects of this process, created on first use, and the pool snapshots seen."""

    def __init__(self, factory: Callable[[MetricSpec], object] = ray_metric):
        self.factory = factory
        self.metrics: dict[str, object] = {}
        self.pool = CumulativeDeltas()
        self.lock = threading.Lock()

    def get(self, name: str):
        with self.lock:
            if name not in self.metrics:
                self.metrics[name] = self.factory(SPECS[name])
            return self.metrics[name]

    def inc(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        if value > 0:  # Ray refuses increments of zero
            self.get(name).inc(value, tags=tags)

    def observe(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        self.get(name).observe(value, tags=tags)

    def set(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        self.get(name).set(value, tags=tags)


_state = _State()


def _number(metric: str, value, *, minimum: float = 0.0) -> float:
    """`value` as a float (numpy scalars included), refused when below `minimum` or not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetricValueError(f"{metric}: {value!r} is not a number") from None
    if not number >= minimum:  # also refuses NaN
        raise MetricValueError(f"{metric}: {value!r} is below {minimum:g}")
    return number


def _tenant(tenant: str | None) -> str:
    return NO_TENANT if tenant is None else str(tenant)


def observe_retrieval(seconds: float, top1_score: float | None) -> None:
    """One retrieval: its latency, and the best adapter's score (None: nothing retrieved)."""
    _state.observe("lr_retrieval_seconds", _number("lr_retrieval_seconds", seconds))
    if top1_score is None:
        _state.inc("lr_retrieval_empty", 1)
    else:
        _state.observe("lr_retrieval_top1_score", _number("lr_retrieval_top1_score", top1_score, minimum=-1.0))


def observe_embedding_cache(hits: int, misses: int) -> None:
    """Prompts of one retrieval batch found in, and missing from, the replica's embedding cache."""
    _state.inc("lr_embedding_cache_hits", _number("lr_embedding_cache_hits", hits))
    _state.inc("lr_embedding_cache_misses", _number("lr_embedding_cache_misses", misses))


def observe_request(tenant: str | None, composition: str, adapters: int, status: int) -> None:
    """One answered request (any status); `composition` is a CompositionMode value or UNPLANNED."""
    if composition not in COMPOSITIONS:
        raise MetricValueError(f"lr_requests: composition {composition!r} is not one of {sorted(COMPOSITIONS)}")
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise MetricValueError(f"lr_requests: status {status!r} is not an HTTP status code")
    count = _number("lr_adapters_per_request", adapters)
    _state.inc("lr_requests", 1, {"tenant": _tenant(tenant), "composition": composition, "status": str(status)})
    _state.observe("lr_adapters_per_request", count)


def observe_rejection(tenant: str | None, reason: str) -> None:
    """One request refused at the door; `reason` is a short snake_case word such as 'rate_limited'."""
    if not isinstance(reason, str) or not _REASON.match(reason):
        raise MetricValueError(f"lr_rejections: reason {reason!r} must be 1-32 of a-z, 0-9, '_', starting with a letter")
    _state.inc("lr_rejections", 1, {"tenant": _tenant(tenant), "reason": reason})


def observe_batch(size: int, new_tokens: int, seconds: float) -> None:
    """One decode step of the running batch: rows, new tokens over all rows, and its wall time."""
    rows = _number("lr_batch_size", size, minimum=1.0)
    tokens = _number("lr_generated_tokens", new_tokens)
    elapsed = _number("lr_batch_tokens_per_second", seconds)
    _state.observe("lr_batch_size", rows)
    _state.inc("lr_generated_tokens", tokens)
    if elapsed > 0:
        _state.observe("lr_batch_tokens_per_second", tokens / elapsed)


def observe_ttft(seconds: float) -> None:
    """Time to first token of one request."""
    _state.observe("lr_ttft_seconds", _number("lr_ttft_seconds", seconds))


def set_pool_stats(replica: str, stats: dict) -> None:
    """Export one AdapterPool.stats() snapshot of composer `replica` (call from the process owning the pool).

    The pool's counters are cumulative; each call adds what grew since the last snapshot of
    the same replica. Gauges (resident, device_slots) are set when present."""
    missing = [f for f in REQUIRED_POOL_COUNTERS if f not in stats]
    if missing:
        raise MetricValueError(f"pool stats of replica {replica!r} lack the counters {missing}")
    tags = {"composer": str(replica)}
    values = {f: _number(POOL_COUNTERS[f], stats[f]) for f in POOL_COUNTERS if f in stats}
    gauges = {f: _number(POOL_GAUGES[f], stats[f]) for f in POOL_GAUGES if f in stats}
    with _state.lock:  # one snapshot at a time, so two callers cannot both count the same growth
        deltas = {f: _state.pool.delta(tags["composer"], f, v) for f, v in values.items()}
    for field, delta in deltas.items():
        _state.inc(POOL_COUNTERS[field], delta, tags)
    for field, value in gauges.items():
        _state.set(POOL_GAUGES[field], value, tags)


OTHER = "_other"  # adapter and version tag of versions past the label bound


class VersionLabels:
    """Bounded adapter/version tags: both versions of an adapter under a canary always get their
    own; other versions get theirs while this process has labelled fewer than `cap` of them,
    then count as OTHER. Series per process stay under (cap + 2 x canaries) x roles x statuses,
    however many adapters the registry holds."""

    def __init__(self, cap: int):
        self.cap = cap
        self.labelled: set[tuple[str, str]] = set()
        self.lock = threading.Lock()

    def tags(self, name: str, version: str, record) -> dict[str, str]:
        canary = getattr(record, "canary", None)
        if canary is not None and version == canary.version:
            role = "canary"
        else:
            role = "active" if record is not None and version == record.active_version else "named"
        with self.lock:
            if canary is None and (name, version) not in self.labelled:
                if len(self.labelled) >= self.cap:
                    return {"adapter": OTHER, "version": OTHER, "role": role}
                self.labelled.add((name, version))
        return {"adapter": name, "version": version, "role": role}


class VersionedMetrics:
    """This module's functions as the request pipeline's Metrics, plus observe_versions: each
    request's adapter versions exported with bounded tags, then handed to the canary judge."""

    observe_retrieval = staticmethod(observe_retrieval)
    observe_request = staticmethod(observe_request)
    observe_rejection = staticmethod(observe_rejection)
    observe_ttft = staticmethod(observe_ttft)

    def __init__(self, judge, cap: int):
        self.judge = judge  # services.rollout.canary.CanaryJudge: .catalog (CatalogCache) and .observe
        self.labels = VersionLabels(cap)

    def observe_versions(self, plans, status: int, seconds: float) -> None:
        """One answered request: every adapter version its plans used, once, with the outcome."""
        elapsed = _number("lr_adapter_latency_seconds", seconds)
        catalog = self.judge.catalog.get()
        used = {(a.name, a.version): a.score for plan in plans for a in plan.adapters}
        for (name, version), score in sorted(used.items()):
            tags = self.labels.tags(name, version, catalog.records.get(name))
            _state.inc("lr_adapter_requests", 1, {**tags, "status": str(status)})
            _state.observe("lr_adapter_latency_seconds", elapsed, tags)
            if score is not None:
                _state.observe("lr_adapter_retrieval_score",
                               _number("lr_adapter_retrieval_score", score, minimum=-1.0), tags)
        self.judge.observe(plans, status, seconds)
