"""Serving metrics and the Grafana dashboard, without a Ray cluster.

The recording logic runs against a recorder that keeps every call and refuses what Ray's
metric objects refuse; one test drives the real Ray Serve metric objects (they need no
cluster to validate tags and values). The dashboard tests check its PromQL against the
names Ray exports for the metrics defined in deployments/metrics.py."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from deployments import metrics
from deployments.metrics import COUNTER, GAUGE, HISTOGRAM, SPECS, MetricValueError

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "loraretriever-dashboard.json"
POOL = {"hits": 3, "misses": 2, "loads": 2, "evictions": 0, "load_seconds": 0.5, "resident": 2, "device_slots": 4,
        "prefix_hit_tokens": 16, "prefix_miss_tokens": 40}


class Recorder:
    """Keeps every record as (metric, method, value, tags); refuses what ray.util.metrics refuses."""

    def __init__(self):
        self.calls: list[tuple[str, str, float, dict]] = []
        self.created: list[str] = []

    def __call__(self, spec):
        self.created.append(spec.name)
        recorder = self

        class Metric:
            def _record(self, method, value, tags):
                tags = tags or {}
                assert set(tags) == set(spec.tag_keys), f"{spec.name}: tags {sorted(tags)} != {spec.tag_keys}"
                assert all(isinstance(v, str) for v in tags.values()), f"{spec.name}: non-str tag value {tags}"
                assert type(value) in (int, float), f"{spec.name}: Ray takes int or float, got {type(value)}"
                recorder.calls.append((spec.name, method, value, tags))

            def inc(self, value, tags=None):
                assert spec.kind == COUNTER and value > 0, f"{spec.name}: inc({value}) on a {spec.kind}"
                self._record("inc", value, tags)

            def set(self, value, tags=None):
                assert spec.kind == GAUGE, f"{spec.name}: set on a {spec.kind}"
                self._record("set", value, tags)

            def observe(self, value, tags=None):
                assert spec.kind == HISTOGRAM, f"{spec.name}: observe on a {spec.kind}"
                self._record("observe", value, tags)

        return Metric()

    def total(self, name: str, **tags) -> float:
        return sum(v for n, m, v, t in self.calls if n == name and m == "inc" and tags.items() <= t.items())

    def values(self, name: str) -> list:
        return [(v, t) for n, _, v, t in self.calls if n == name]


@pytest.fixture
def rec(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(metrics, "_state", metrics._State(recorder))
    return recorder


# ---- adapter pool: cumulative snapshots -> counter increments ---------------------------
def test_pool_counter_increments_add_up_to_the_last_snapshot(rec):
    later = {**POOL, "hits": 10, "misses": 3, "loads": 3, "evictions": 1, "load_seconds": 0.75, "resident": 4}
    metrics.set_pool_stats("c1", POOL)
    metrics.set_pool_stats("c1", POOL)  # nothing grew: nothing is added
    metrics.set_pool_stats("c1", later)
    for field in metrics.REQUIRED_POOL_COUNTERS:
        assert math.isclose(rec.total(metrics.POOL_COUNTERS[field]), later[field]), field
    assert [v for v, _ in rec.values("lr_pool_hits")] == [3, 7]
    assert [v for v, _ in rec.values("lr_pool_evictions")] == [1]  # the zero growths were skipped
    assert [v for v, _ in rec.values("lr_pool_resident")] == [2, 2, 4]
    assert rec.values("lr_pool_device_slots")[-1] == (4, {"composer": "c1"})


def test_each_replica_is_counted_from_its_own_last_snapshot(rec):
    metrics.set_pool_stats("c1", POOL)
    metrics.set_pool_stats("c2", {**POOL, "hits": 5})
    metrics.set_pool_stats("c1", {**POOL, "hits": 8})
    metrics.set_pool_stats("c2", {**POOL, "hits": 6})
    assert rec.total("lr_pool_hits", composer="c1") == 8
    assert rec.total("lr_pool_hits", composer="c2") == 6


def test_a_restarted_pool_counts_again_from_zero(rec):
    metrics.set_pool_stats("c1", {**POOL, "hits": 10})
    metrics.set_pool_stats("c1", {**POOL, "hits": 4})  # the replica's pool was rebuilt
    metrics.set_pool_stats("c1", {**POOL, "hits": 6})
    assert [v for v, _ in rec.values("lr_pool_hits")] == [10, 4, 2]


def test_optional_pool_counters_are_exported_when_present(rec):
    metrics.set_pool_stats("c1", {**POOL, "cpu_evictions": 2, "disk_reloads": 1, "pinned": 1, "rank": 8})
    assert rec.total("lr_pool_cpu_evictions") == 2 and rec.total("lr_pool_disk_reloads") == 1


@pytest.mark.parametrize("bad, named", [
    ({k: v for k, v in POOL.items() if k != "load_seconds"}, "load_seconds"),
    ({**POOL, "misses": -1}, "lr_pool_misses"),
    ({**POOL, "loads": "three"}, "lr_pool_loads"),
    ({**POOL, "resident": float("nan")}, "lr_pool_resident"),
])
def test_a_bad_snapshot_is_refused_whole(rec, bad, named):
    with pytest.raises(MetricValueError, match=named):
        metrics.set_pool_stats("c1", {**bad, "hits": 9})
    assert rec.calls == []
    metrics.set_pool_stats("c1", POOL)  # the refused snapshot left no memory behind
    assert rec.total("lr_pool_hits") == 3


# ---- per-request observations ---------------------------------------------------------------
def test_requests_are_counted_by_tenant_composition_and_status(rec):
    metrics.observe_request("acme", "mixture", 3, 200)
    metrics.observe_request(None, "none", 0, 200)
    metrics.observe_request("acme", metrics.UNPLANNED, 0, 400)
    assert rec.values("lr_requests") == [
        (1, {"tenant": "acme", "composition": "mixture", "status": "200"}),
        (1, {"tenant": metrics.NO_TENANT, "composition": "none", "status": "200"}),
        (1, {"tenant": "acme", "composition": "unplanned", "status": "400"}),
    ]
    assert [v for v, _ in rec.values("lr_adapters_per_request")] == [3.0, 0.0, 0.0]


@pytest.mark.parametrize("args, named", [
    (("acme", "blend", 2, 200), "composition 'blend'"),
    (("acme", "mixture", 2, 1000), "status 1000"),
    (("acme", "mixture", 2, "200"), "status '200'"),
    (("acme", "mixture", -1, 200), "lr_adapters_per_request"),
])
def test_bad_request_observations_are_refused(rec, args, named):
    with pytest.raises(MetricValueError, match=named):
        metrics.observe_request(*args)
    assert rec.values("lr_requests") == []


def test_rejections_take_a_short_reason_word(rec):
    metrics.observe_rejection(None, "unauthorized")
    metrics.observe_rejection("acme", "rate_limited")
    assert [t for _, t in rec.values("lr_rejections")] == [
        {"tenant": metrics.NO_TENANT, "reason": "unauthorized"}, {"tenant": "acme", "reason": "rate_limited"}]
    with pytest.raises(MetricValueError, match="reason 'too many requests'"):
        metrics.observe_rejection("acme", "too many requests")


def test_retrieval_records_latency_and_top1_score_or_an_empty_result(rec):
    metrics.observe_retrieval(0.012, np.float32(0.75))  # scores come out of numpy
    metrics.observe_retrieval(0.004, None)
    assert [v for v, _ in rec.values("lr_retrieval_seconds")] == [0.012, 0.004]
    assert rec.values("lr_retrieval_top1_score") == [(pytest.approx(0.75), {})]
    assert rec.total("lr_retrieval_empty") == 1
    with pytest.raises(MetricValueError, match="lr_retrieval_seconds"):
        metrics.observe_retrieval(-0.1, 0.5)


def test_embedding_cache_counts_hits_and_misses_of_a_batch(rec):
    metrics.observe_embedding_cache(3, 1)
    metrics.observe_embedding_cache(0, 2)  # nothing cached: no zero increment reaches Ray
    assert rec.total("lr_embedding_cache_hits") == 3
    assert rec.total("lr_embedding_cache_misses") == 3
    with pytest.raises(MetricValueError, match="lr_embedding_cache_hits"):
        metrics.observe_embedding_cache(-1, 0)


def test_batches_record_size_tokens_and_speed(rec):
    metrics.observe_batch(4, 100, 0.5)
    metrics.observe_batch(2, 0, 0.0)  # a batch that ended at once: no tokens, no speed
    assert [v for v, _ in rec.values("lr_batch_size")] == [4, 2]
    assert rec.total("lr_generated_tokens") == 100
    assert [v for v, _ in rec.values("lr_batch_tokens_per_second")] == [200.0]
    with pytest.raises(MetricValueError, match="lr_batch_size"):
        metrics.observe_batch(0, 10, 0.1)


def test_metric_objects_are_created_once_and_only_when_used(rec):
    assert rec.created == []
    metrics.observe_ttft(0.2)
    metrics.observe_ttft(0.3)
    assert rec.created == ["lr_ttft_seconds"]
    assert [v for v, _ in rec.values("lr_ttft_seconds")] == [0.2, 0.3]


class NoCanaryJudge:
    """The canary judge's two members VersionedMetrics uses: an empty catalog, and observe."""

    def __init__(self):
        from services.serving.catalog import Catalog

        self.catalog = type("Cache", (), {"get": lambda _: Catalog()})()
        self.seen = []

    def observe(self, plans, status, seconds):
        self.seen.append((len(plans), status))


def plan(*adapters):
    from services.schemas import CompositionPlan, UsedAdapter

    return CompositionPlan(adapters=[UsedAdapter(name=n, version=v, weight=1.0, score=s) for n, v, s in adapters])


def test_real_ray_serve_metrics_accept_every_call(monkeypatch):
    """Ray's own objects check tag keys, tag value types and increments; no cluster is needed."""
    monkeypatch.setattr(metrics, "_state", metrics._State())
    metrics.observe_retrieval(0.01, np.float64(0.8))
    metrics.observe_retrieval(0.01, None)
    metrics.observe_embedding_cache(3, 1)
    metrics.observe_request(None, "fusion", 2, 200)
    metrics.observe_rejection("acme", "concurrency_limited")
    metrics.observe_batch(3, 30, 0.1)
    metrics.observe_ttft(0.05)
    metrics.set_pool_stats("c1", POOL)
    metrics.set_pool_stats("c1", {**POOL, "hits": 4, "evictions": 1, "cpu_evictions": 1, "disk_reloads": 1})
    metrics.VersionedMetrics(NoCanaryJudge(), cap=4).observe_versions([plan(("a", "v1", 0.7))], 200, 0.2)
    assert set(metrics._state.metrics) == set(SPECS)


# ---- export names ----------------------------------------------------------------------------
def test_the_export_rule_matches_the_installed_ray():
    """`ray_` from Ray's OpenTelemetry recorder; unit '1' adds no suffix; a counter family adds `_total`."""
    from opentelemetry.exporter.prometheus._mapping import map_unit
    from prometheus_client.core import CounterMetricFamily
    from ray._private.telemetry.open_telemetry_metric_recorder import NAMESPACE

    assert NAMESPACE + "_" == metrics.EXPORT_PREFIX
    assert map_unit("1") == ""
    family = CounterMetricFamily(metrics.EXPORT_PREFIX + "lr_requests", "", labels=[])
    family.add_metric([], 1.0)
    assert [s.name for s in family.samples] == list(SPECS["lr_requests"].exported_names())


# ---- the Grafana dashboard -------------------------------------------------------------------
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs() -> list[str]:
    """Every PromQL text of the dashboard: panel targets and template variable queries."""
    dash = dashboard()
    return ([t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
            + [v["definition"] for v in dash["templating"]["list"] if "definition" in v])


def serve_builtin_names() -> set[str]:
    """Exported names of Ray Serve's own metrics, read from the installed Ray source."""
    import importlib.util

    root = Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / "serve" / "_private"
    created = re.compile(r'metrics\.(Counter|Gauge|Histogram)\(\s*(?:name\s*=\s*)?f?"(serve_[a-z_{}]+)"')
    kinds = {"Counter": COUNTER, "Gauge": GAUGE, "Histogram": HISTOGRAM}
    names = set()
    for path in root.rglob("*.py"):
        for kind, name in created.findall(path.read_text().replace("{protocol_name}", "http")):
            names.update(metrics.MetricSpec(name, kinds[kind], "").exported_names())
    return names


def test_dashboard_is_a_grafana_dashboard():
    dash = dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(graphs) >= 12
    for p in graphs:
        pos = p["gridPos"]
        assert p["title"] and pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_dashboard_uses_only_exported_names_of_defined_metrics():
    exported = {n for spec in SPECS.values() for n in spec.exported_names()}
    used = {m for e in exprs() for m in re.findall(r"\b[a-z_]*lr_[a-z0-9_]+", e)}
    assert used, "the dashboard queries none of our metrics"
    assert used <= exported, f"not exported by Ray under these names: {sorted(used - exported)}"
    unused = [s.name for s in SPECS.values() if not set(s.exported_names()) & used]
    assert unused == [], f"metrics without a panel: {unused}"


def test_dashboard_ray_serve_metrics_exist_in_the_installed_ray():
    used = {m for e in exprs() for m in re.findall(r"\bray_serve_[a-z0-9_]+", e)}
    assert {"ray_serve_deployment_request_counter_total", "ray_serve_deployment_replica_healthy"} <= used
    assert used <= serve_builtin_names(), f"unknown Ray Serve metrics: {sorted(used - serve_builtin_names())}"


def test_the_observability_doc_lists_every_metric_under_its_exported_name():
    doc = (DASHBOARD.parents[2] / "docs" / "observability.md").read_text()
    missing = [s.name for s in SPECS.values() if f"`{s.exported_names()[0].removesuffix('_bucket')}`" not in doc]
    assert missing == [], f"docs/observability.md does not list {missing}"
