"""`loraretriever status` rendering: placement with each replica's adapter cache hit rate."""
from __future__ import annotations

from cluster.status import hit_rate, render_status


def test_hit_rate_from_pool_counters():
    assert hit_rate({"hits": 3, "misses": 1}) == 0.75
    assert hit_rate({}) is None and hit_rate({"hits": 0, "misses": 0}) is None


def test_render_shows_serve_adapters_and_placement():
    report = {
        "serve": {"status": "RUNNING", "deployments": {"Composer": {"status": "HEALTHY", "replicas": {"RUNNING": 2}}}},
        "adapters": [{"name": "add", "active": "v2", "versions": ["v1", "v2"], "domain": "arithmetic",
                      "visibility": "shared", "owner": None, "canary": {"version": "v3", "percent": 10.0}}],
        "placement": {"r1": {"resident": ["add@v2"], "queue_len": 1, "hit_rate": 0.9, "seen_s_ago": 0.5},
                      "r2": {"resident": [], "queue_len": 0, "hit_rate": None, "seen_s_ago": 1.0}},
    }
    text = render_status(report)
    assert "application: RUNNING" in text and "canary v3@10.0%" in text
    r1, r2 = (line for line in text.splitlines() if line.lstrip().startswith(("r1", "r2")))
    assert "hit rate 90%" in r1 and "add@v2" in r1
    assert "hit rate -" in r2 and r2.rstrip().endswith("resident: -")


def test_render_shows_an_automatic_canary_progress_and_the_last_verdict():
    canary = {"version": "v4", "percent": 20.0, "auto": True, "min_requests": 50,
              "arms": {"canary": {"requests": 12, "errors": 1}, "active": {"requests": 40, "errors": 0}}}
    report = {"serve": {"error": "no cluster"}, "placement": {},
              "adapters": [{"name": "add", "active": "v3", "versions": ["v3", "v4"], "domain": "arithmetic",
                            "visibility": "shared", "owner": None, "canary": canary,
                            "last_verdict": "v3 promoted: errors 0/50"}]}
    text = render_status(report)
    assert "canary v4@20.0% auto: 12/50 requests, 1 errors (active 0/40)" in text
    assert "last canary verdict: v3 promoted: errors 0/50" in text
