"""PrefixAwareRouter: Ray Serve's RequestRouter interface around prefix_policy.PrefixAffinity.

Why our own router rather than Ray's PrefixCacheAffinityRouter (ray.serve.llm.request_router): Ray's matches
characters of the concatenated message texts in a prefix tree kept in a separate detached actor, queried with
blocking ray.get calls on every request, and ignores the chat template; ours matches what the engine's prefix cache
actually holds (block hashes of the templated token ids, computed once by the ingress: prefix_key.py), keeps its
table in the router's own process, and decides without any remote call but Serve's own queue-length probes.

It runs where the DeploymentHandle lives (the ingress). Each request's first argument is a ForwardedRequest whose
prefix_hashes it reads; the replica it picks comes first, every other replica after it (least loaded first), so a
full replica is skipped rather than waited on.
"""

from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ownllm.ray_serve.prefix_policy import DEFAULT_IMBALANCE_THRESHOLD, DEFAULT_MIN_MATCHED_BLOCKS, PrefixAffinity


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD,
                         min_matched_blocks: int = DEFAULT_MIN_MATCHED_BLOCKS) -> None:
        self.affinity = PrefixAffinity(imbalance_threshold, min_matched_blocks)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        loads = await self._loads(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        hashes = _prefix_hashes(pending_request)
        chosen = self.affinity.choose(hashes, loads)
        self.affinity.record(hashes, chosen)  # now, so a burst sharing this prefix follows it before it is sent
        rest = sorted((r for r in candidate_replicas if r.replica_id.unique_id in loads and
                       r.replica_id.unique_id != chosen), key=lambda r: loads[r.replica_id.unique_id])
        return [[by_id[chosen]], rest]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.affinity.record(_prefix_hashes(pending_request), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.affinity.forget(replica_id.unique_id)

    async def _loads(self, replicas: List[RunningReplica]) -> dict[str, int]:
        """Requests in flight on each replica, from Serve's queue-length cache, probing those it lacks."""
        cache = self.replica_queue_len_cache
        loads = {r.replica_id.unique_id: cache.get(r.replica_id) for r in replicas}
        missing = [r for r in replicas if loads[r.replica_id.unique_id] is None]
        if missing:
            for replica, queue_len in await self._probe_queue_lens(missing, 0):
                loads[replica.replica_id.unique_id] = queue_len
        known = {replica: load for replica, load in loads.items() if load is not None}
        return known or {replica: 0 for replica in loads}


def _prefix_hashes(pending_request: Optional[PendingRequest]) -> tuple[int, ...]:
    if pending_request is None or not pending_request.args:
        return ()
    return getattr(pending_request.args[0], "prefix_hashes", ())
