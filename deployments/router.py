"""Adapter-affinity request routing for the composer group (Ray Serve RequestRouter API).

A request goes to the replica that already holds most of its adapters (no load from the
CPU tier or disk), unless that replica's queue is much longer than the least-loaded one:
then load wins, so one hot adapter set cannot pin all traffic to one replica.
Replicas report their resident adapters through `record_routing_stats`.
"""
from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from services.serving.composer_service import ComposeJob


def request_adapter_keys(pending: Optional[PendingRequest]) -> set[str]:
    """name@version keys of the ComposeJob a composer call carries as its first argument."""
    if pending is None or not pending.args or not isinstance(pending.args[0], ComposeJob):
        return set()
    return set(pending.args[0].plan.keys())


def rank_by_affinity(wanted: set[str], replicas: list, queue_lens: dict, spread_threshold: int) -> list[list]:
    """Ranks of replicas, best first (pure function: the router's policy, unit-tested alone).

    replicas: objects with `.replica_id` and `.routing_stats` ({"resident": [...]});
    queue_lens: replica_id -> known queue length (missing = unknown, treated as 0)."""
    if not replicas:
        return []

    def load(r) -> int:
        return queue_lens.get(r.replica_id) or 0

    least = min(load(r) for r in replicas)
    by_load = sorted(replicas, key=load)
    if not wanted:
        return [by_load]

    def hits(r) -> int:
        return len(wanted & set((r.routing_stats or {}).get("resident", ())))

    # Affinity counts only where the queue is not far behind the least-loaded replica.
    eligible = [r for r in replicas if hits(r) > 0 and load(r) - least <= spread_threshold]
    if not eligible:
        return [by_load]
    preferred = sorted(eligible, key=lambda r: (-hits(r), load(r)))
    rest = [r for r in by_load if r not in preferred]
    return [preferred, rest] if rest else [preferred]


class AdapterAffinityRouter(RequestRouter):
    def initialize_state(self, spread_threshold: int = 4, **kwargs):
        """spread_threshold: how many more queued requests than the least-loaded replica the
        affinity replica may have before load-based routing takes over."""
        self.spread_threshold = spread_threshold

    async def choose_replicas(
        self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> List[List[RunningReplica]]:
        if pending_request is not None:
            # Every candidate is in the ranks: if none takes the request, wait before the next try
            # (without this flag Serve retries at once, spinning the router's event loop).
            pending_request.routing_context.should_backoff = True
        queue_lens = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas}
        return rank_by_affinity(
            request_adapter_keys(pending_request), candidate_replicas, queue_lens, self.spread_threshold
        )
