"""Autoscaling on queue length and KV-cache use: a Ray Serve custom autoscaling policy, and the config that names it.

Serve's own policy sizes a deployment by requests in flight (queued or running) over target_ongoing_requests per
replica. Requests alone miss memory: few long conversations can fill a replica's KV cache (then the engine queues
or preempts) while the request count looks low. So the replicas report their KV-cache use (Replica.
record_autoscaling_stats, Serve's custom-metrics hook) and the desired count is the larger of the two:

    by_requests = requests in flight / target_ongoing_requests
    by_kv       = replicas * mean KV-cache use / target_kv_usage

Serve then applies min/max replicas and its up/down-scaling delays around this function (it wraps custom
policies). Plain Python over Serve's AutoscalingContext: imported by the Serve controller by its path.
"""

from __future__ import annotations

from typing import Any

POLICY_PATH = "ownllm.ray_serve.autoscaling:queue_and_kv_policy"
TARGET_ONGOING_REQUESTS = 16  # per replica: a quarter of max_num_seqs keeps decode steps small enough for ITL
TARGET_KV_USAGE = 0.7  # of a replica's KV blocks, leaving room for the running requests to grow
KV_USAGE_METRIC = "kv_cache_usage"


def queue_and_kv_policy(ctx: Any, target_kv_usage: float = TARGET_KV_USAGE) -> tuple[float, dict]:
    """-> (desired replicas, policy state) from Serve's AutoscalingContext."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    by_requests = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
    usage = (ctx.aggregated_metrics or {}).get(KV_USAGE_METRIC) or {}
    by_kv = ctx.current_num_replicas * (sum(usage.values()) / len(usage)) / target_kv_usage if usage else 0.0
    return max(by_requests, by_kv), {}


def autoscaling_config(min_replicas: int, max_replicas: int, initial_replicas: int) -> dict:
    """Serve's autoscaling_config for the replica deployment."""
    return {"min_replicas": min_replicas, "max_replicas": max_replicas, "initial_replicas": initial_replicas,
            "target_ongoing_requests": TARGET_ONGOING_REQUESTS, "upscale_delay_s": 10, "downscale_delay_s": 120,
            "metrics_interval_s": 2, "look_back_period_s": 10, "policy": {"policy_function": POLICY_PATH}}
