"""The affinity routing policy, as a pure function (no Ray cluster needed)."""
from __future__ import annotations

from types import SimpleNamespace

from deployments.router import rank_by_affinity, request_adapter_keys
from services.composition import AdapterKey
from services.schemas import CompositionPlan, UsedAdapter
from services.serving.composer_service import ComposeJob


def replica(rid, resident):
    return SimpleNamespace(replica_id=rid, routing_stats={"resident": resident})


A, B, C = replica("a", ["x@1", "y@1"]), replica("b", ["z@1"]), replica("c", [])


def ids(ranks):
    return [[r.replica_id for r in rank] for rank in ranks]


def test_prefers_the_replica_holding_most_adapters():
    assert ids(rank_by_affinity({"x@1", "y@1"}, [B, C, A], {}, 4))[0] == ["a"]
    assert ids(rank_by_affinity({"z@1"}, [A, B, C], {}, 4))[0] == ["b"]


def test_spreads_when_the_preferred_queue_is_long():
    ranks = rank_by_affinity({"x@1"}, [A, B, C], {"a": 10, "b": 1, "c": 0}, 4)
    assert ids(ranks) == [["c", "b", "a"]]


def test_no_adapters_or_no_holder_means_least_loaded_first():
    assert ids(rank_by_affinity(set(), [A, B, C], {"a": 3, "b": 2, "c": 5}, 4)) == [["b", "a", "c"]]
    assert ids(rank_by_affinity({"q@1"}, [A, B], {"a": 1, "b": 0}, 4)) == [["b", "a"]]


def test_request_keys_come_from_the_compose_job():
    """The router reads the same ComposeJob the Ingress sends, so a renamed field breaks this test."""
    plan = CompositionPlan(adapters=[UsedAdapter(name="x", version="1", weight=0.5),
                                     UsedAdapter(name="y", version="3", weight=0.5)], composition="mixture")
    pending = SimpleNamespace(args=[ComposeJob(request_id="r", prompt="hi", plan=plan)])
    assert request_adapter_keys(pending) == {str(AdapterKey("x", "1")), str(AdapterKey("y", "3"))} == {"x@1", "y@3"}
    assert request_adapter_keys(SimpleNamespace(args=[{"plan": {}}])) == set()  # not a job: no affinity
    assert request_adapter_keys(None) == set()
