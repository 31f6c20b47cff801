"""CatalogCache: a registry snapshot re-read on a timer, and at once for an adapter it lacks."""
from __future__ import annotations

from types import SimpleNamespace

from services.serving.catalog import CatalogCache


class CountingRegistry:
    """generation() and snapshot() of the real registry, over a dict that a test edits."""

    def __init__(self):
        self.records, self.gen, self.generation_calls = {}, 0, 0

    def add(self, name: str, versions=("v1",)):
        self.records[name] = SimpleNamespace(name=name, active_version=versions[-1], versions=list(versions),
                                             owner_tenant=None, visibility="shared", canary=None)
        self.gen += 1

    def generation(self) -> int:
        self.generation_calls += 1
        return self.gen

    def snapshot(self):
        return list(self.records.values())


def test_a_new_adapter_is_seen_by_the_next_request_that_names_it():
    registry = CountingRegistry()
    registry.add("old")
    cache = CatalogCache(registry, min_interval_s=3600, miss_interval_s=0)
    assert cache.get().knows("old")
    registry.add("new", versions=("v1", "v2"))
    assert not cache.get().knows("new")  # unnamed: the timer decides, and an hour has not passed
    assert cache.get(wanted=["old"]).knows("new") is False  # a known name does not re-read
    assert cache.get(wanted=["new"]).knows("new")
    assert cache.get().knows("new@v2") and not cache.get().knows("new@v3")


def test_names_the_registry_lacks_re_read_at_most_every_miss_interval():
    registry = CountingRegistry()
    cache = CatalogCache(registry, min_interval_s=3600, miss_interval_s=3600)
    cache.get(force=True)
    calls = registry.generation_calls
    for _ in range(50):  # a client asking for a missing adapter does not turn into a Redis call each
        assert not cache.get(wanted=["missing"]).knows("missing")
    assert registry.generation_calls == calls
