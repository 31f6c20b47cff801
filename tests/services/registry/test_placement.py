"""PlacementStore over a real Redis: heartbeats, expiry, and Redis going away."""
from __future__ import annotations

import time

import pytest
import redis

from cluster.redis_server import RedisServer
from services.registry.errors import RegistryError, RegistryUnavailable
from services.registry.placement import INDEX_KEY, PlacementStore


def test_heartbeats_are_listed_with_their_state(redis_client):
    placement = PlacementStore(redis_client)
    before = time.time()
    placement.heartbeat("replica-a", ["math@v1", "code@v2"], queue_len=3, pool={"hits": 7, "misses": 2})
    placement.heartbeat("replica-b", [])
    live = placement.replicas()
    assert sorted(live) == ["replica-a", "replica-b"]
    assert live["replica-a"].resident == ["math@v1", "code@v2"] and live["replica-a"].queue_len == 3
    assert live["replica-a"].pool == {"hits": 7, "misses": 2} and live["replica-b"].pool == {}
    assert live["replica-a"].last_seen >= before
    placement.heartbeat("replica-a", ["math@v1"], queue_len=0)
    assert placement.replicas()["replica-a"].resident == ["math@v1"]


def test_a_silent_replica_expires_and_is_unindexed(redis_client):
    placement = PlacementStore(redis_client, ttl_s=0.2)
    placement.heartbeat("gone", ["math@v1"])
    PlacementStore(redis_client, ttl_s=60).heartbeat("stays", [])
    time.sleep(0.4)
    assert list(placement.replicas()) == ["stays"]
    assert redis_client.smembers(INDEX_KEY) == {"stays"}


def test_remove_forgets_a_replica_at_once(redis_client):
    placement = PlacementStore(redis_client)
    placement.heartbeat("r1", ["a@v1"])
    placement.remove("r1")
    assert placement.replicas() == {}


def test_bad_replica_ids_are_refused(redis_client):
    with pytest.raises(RegistryError, match="replica id"):
        PlacementStore(redis_client).heartbeat("", [])
    with pytest.raises(RegistryError, match="replica id"):
        PlacementStore(redis_client).heartbeat("a\nb", [])


def test_redis_down_is_reported_as_unavailable():
    server = RedisServer().start()
    placement = PlacementStore(redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1))
    placement.heartbeat("r1", ["a@v1"])
    server.stop()
    with pytest.raises(RegistryUnavailable, match=r"heartbeat of replica 'r1'.*unavailable"):
        placement.heartbeat("r1", ["a@v1"])
    with pytest.raises(RegistryUnavailable, match="read replica placement"):
        placement.replicas()
