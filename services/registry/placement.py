"""Which composer replica holds which adapters, from heartbeats that expire.

Each replica writes one key with a TTL; a replica that stops beating vanishes after
`ttl_s` without anyone cleaning up. A set indexes the keys so listing needs no SCAN."""
from __future__ import annotations

import json
import time

import redis
from pydantic import BaseModel, Field

from services.registry.errors import RegistryError
from services.registry.redis_access import guarded

PREFIX = "lr:placement:"
INDEX_KEY = "lr:placement-index"
# Unindex a replica only if its key is still gone: it may have beaten again since the read.
PRUNE_SCRIPT = "if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[1]) end return 0"


class ReplicaState(BaseModel):
    replica_id: str
    resident: list[str] = Field(description="adapter keys (name@version) loaded on the replica")
    queue_len: int = Field(0, ge=0, description="requests waiting on the replica")
    pool: dict[str, float] = Field(default_factory=dict,
                                   description="adapter pool counters: hits, misses, loads, evictions, ...")
    last_seen: float = Field(description="unix time of the last heartbeat")


class PlacementStore:
    def __init__(self, redis_client: redis.Redis, ttl_s: float = 15.0):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s={ttl_s} must be positive")
        self.r = redis_client
        self.ttl_ms = int(ttl_s * 1000)

    def heartbeat(self, replica_id: str, resident: list[str], *, queue_len: int = 0,
                  pool: dict[str, float] | None = None) -> None:
        state = ReplicaState(replica_id=check_replica_id(replica_id), resident=list(resident),
                             queue_len=queue_len, pool=pool or {}, last_seen=time.time())
        with guarded(self.r, f"record the heartbeat of replica {replica_id!r}"):
            pipe = self.r.pipeline(transaction=True)
            pipe.set(PREFIX + replica_id, state.model_dump_json(), px=self.ttl_ms)
            pipe.sadd(INDEX_KEY, replica_id)
            pipe.execute()

    def remove(self, replica_id: str) -> None:
        """A replica shutting down cleanly says so instead of waiting out its TTL."""
        with guarded(self.r, f"remove replica {replica_id!r}"):
            pipe = self.r.pipeline(transaction=True)
            pipe.delete(PREFIX + replica_id)
            pipe.srem(INDEX_KEY, replica_id)
            pipe.execute()

    def replicas(self) -> dict[str, ReplicaState]:
        """Live replicas only, by id; index entries whose key expired are pruned."""
        with guarded(self.r, "read replica placement"):
            ids = sorted(as_str(i) for i in self.r.smembers(INDEX_KEY))
            values = self.r.mget([PREFIX + i for i in ids]) if ids else []
            live, dead = {}, []
            for replica_id, raw in zip(ids, values):
                if raw is None:
                    dead.append(replica_id)
                else:
                    live[replica_id] = ReplicaState.model_validate(json.loads(raw))
            for replica_id in dead:
                self.r.eval(PRUNE_SCRIPT, 2, PREFIX + replica_id, INDEX_KEY, replica_id)
            return live


def check_replica_id(replica_id: str) -> str:
    if not isinstance(replica_id, str) or not replica_id or len(replica_id) > 256 or not replica_id.isprintable():
        raise RegistryError(f"replica id {replica_id!r} must be 1-256 printable characters")
    return replica_id


def as_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
