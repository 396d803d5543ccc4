"""PrefixAwareRouter: Ray Serve's custom request router for LLMServer (Ray 2.60 API).

Serve runs one router per DeploymentHandle (in the Ingress replica, here), calls
`choose_replicas` for each pending request and sends it to the first rank's least-queued replica
that accepts it. This router ranks the replica holding the longest cached prefix of the request
first, unless it is overloaded (routing_policy.py states the rule); otherwise power of two.

What a replica holds comes from two places:
- its `record_routing_stats()` report (every `request_routing_stats_period_s`): the prefix
  digests it served recently (bounded by its KV pool) and its load (running, waiting, KV usage);
- what this router sent it since, remembered here at once, so the second request of a new
  system prompt already lands next to the first one instead of waiting a report period.
With several ingress replicas the reports make every router learn the others' placements.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any, Collection, Dict, List, Optional

from ray.serve.request_router import (LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID,
                                      RequestRouter, RunningReplica)

from raylm.cluster.serve.prefix_hash import request_prefix_digests
from raylm.cluster.serve.routing_policy import ReplicaLoad, RouterConfig, InFlight, choose

ROUTED_MEMORY = 65536  # digests this router remembers having sent somewhere (LRU)
ROUTED_METHOD = "generate"
IN_FLIGHT_SWEEP = 4096  # in-flight table size that triggers a look for never-sent requests


class _Held(Collection[int]):
    """A replica's digests: reported by it, or routed to it by this router since."""

    def __init__(self, reported: frozenset[int], routed: "OrderedDict[int, str]", replica: str):
        self._reported, self._routed, self._replica = reported, routed, replica

    def __contains__(self, digest: object) -> bool:
        return digest in self._reported or self._routed.get(digest) == self._replica

    def __iter__(self):
        return iter(self._reported)

    def __len__(self) -> int:
        return len(self._reported)


# No FIFOMixin: with it Serve hands the replica chosen for one request to the oldest pending
# request instead, so a request could land next to another request's prefix.
class PrefixAwareRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, imbalance_threshold: float = 8.0, kv_overload: float = 0.95,
                         min_match_chunks: int = 1, **_: Any) -> None:
        self._policy = RouterConfig(imbalance_threshold=imbalance_threshold,
                                    kv_overload=kv_overload, min_match_chunks=min_match_chunks)
        self._rng = random.Random()
        self._routed: OrderedDict[int, str] = OrderedDict()
        # replica id -> (report sequence number, its digests as a set): built once per report
        self._reported: Dict[str, tuple[int, frozenset[int]]] = {}
        self._inflight = InFlight()
        self._inflight_requests: Dict[str, PendingRequest] = {}  # to drop those never sent
        self._sweep_at = IN_FLIGHT_SWEEP
        from ray.util import metrics

        # why each request went where it went: prefix / prefix-overloaded / no-prefix
        self._decisions = metrics.Counter(
            "raylm_router_decisions_total", "Routing decisions of PrefixAwareRouter, by reason.",
            tag_keys=("reason",))

    def _request_digests(self, pending_request: Optional[PendingRequest]) -> list[int]:
        if pending_request is None or pending_request.metadata.call_method != ROUTED_METHOD:
            return []
        args = pending_request.args
        return request_prefix_digests(args[0]) if args else []

    def _reported_digests(self, replica: RunningReplica) -> frozenset[int]:
        stats = replica.routing_stats or {}
        rid = replica.replica_id.unique_id
        seq = int(stats.get("seq", -1))
        cached = self._reported.get(rid)
        if cached is None or cached[0] != seq:
            cached = (seq, frozenset(stats.get("prefix_digests") or ()))
            self._reported[rid] = cached
        return cached[1]

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        stats = replica.routing_stats or {}
        reported = float(stats.get("num_running", 0)) + float(stats.get("num_waiting", 0))
        # what this router chose and has not seen complete, and the handle's queue-length cache
        # (sent and not finished): both fresher than the report, neither sees other routers
        load = max(reported, float(self._inflight.count(replica.replica_id.unique_id)))
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        load = max(load, float(queued)) if queued is not None else load
        return ReplicaLoad(replica.replica_id.unique_id, load, float(stats.get("kv_usage", 0.0)))

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None
                              ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        digests = self._request_digests(pending_request)
        held = {rid: _Held(self._reported_digests(r), self._routed, rid)
                for rid, r in by_id.items()} if digests else {}
        decision = choose(digests, [self._load(r) for r in candidate_replicas], held,
                          self._policy, self._rng)
        self._decisions.inc(1, tags={"reason": decision.reason})
        if pending_request is not None and decision.ranks and decision.ranks[0]:
            self._count_in_flight(pending_request, decision.ranks[0][0])
        return [[by_id[rid] for rid in rank] for rank in decision.ranks]

    def _count_in_flight(self, pending_request: PendingRequest, replica_id: str) -> None:
        """Count the request at the replica ranked first (Serve sends it there unless that
        replica rejects it; on_request_routed corrects it then)."""
        request_id = pending_request.metadata.internal_request_id
        self._inflight.add(request_id, replica_id)
        self._inflight_requests[request_id] = pending_request
        if len(self._inflight_requests) > self._sweep_at:
            # requests cancelled before they were sent never complete: uncount them (amortised:
            # the next sweep waits until the table has doubled again)
            for rid, pr in list(self._inflight_requests.items()):
                if pr.future.cancelled():
                    self._inflight.done(rid)
                    del self._inflight_requests[rid]
            self._sweep_at = max(IN_FLIGHT_SWEEP, 2 * len(self._inflight_requests))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._inflight.done(internal_request_id)
        self._inflight_requests.pop(internal_request_id, None)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        self._inflight.add(pending_request.metadata.internal_request_id, replica_id.unique_id)
        for digest in self._request_digests(pending_request):
            self._routed[digest] = replica_id.unique_id
            self._routed.move_to_end(digest)
        while len(self._routed) > ROUTED_MEMORY:
            self._routed.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._reported.pop(replica_id.unique_id, None)
        self._inflight.forget_replica(replica_id.unique_id)
