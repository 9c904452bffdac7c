"""serve_replicas: starts (or joins) Ray, deploys the Replica deployment with its router, autoscaling and health
checks, and builds the ingress in front of it; `ownllm serve --replicas` then serves that ingress on its port.

Local Ray (no --ray-address) is started with as many CPUs as the replicas' threads need at most, so Ray places
one replica per `threads_per_replica` cores. Replicas whose process dies, or whose engine stops (check_health),
are replaced by Serve's controller; max_ongoing_requests is high because each engine batches and queues by itself
(its --max-waiting answers 503 when full).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from starlette.applications import Starlette

from ownllm.ray_serve import ReplicaScaling
from ownllm.ray_serve.autoscaling import autoscaling_config
from ownllm.ray_serve.prefix_policy import DEFAULT_IMBALANCE_THRESHOLD
from ownllm.server.launch import ServeSpec
from ownllm.server.shutdown import Drain

APP_NAME = "ownllm"
MAX_ONGOING_REQUESTS = 1024
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0


@dataclass
class RayDeployment:
    app: Starlette
    drain: Drain
    handle: object  # the replicas' DeploymentHandle
    shutdown: Callable[[], None]


def serve_replicas(spec: ServeSpec, scaling: ReplicaScaling, prefix_routing: bool = True,
                   imbalance_threshold: int = DEFAULT_IMBALANCE_THRESHOLD, app_name: str = APP_NAME) -> RayDeployment:
    """Deploys the replicas of `spec` and -> the ingress in front of them (the caller serves it)."""
    import ray
    from ray import serve

    from ownllm.ray_serve.ingress import build_ingress
    from ownllm.ray_serve.replica import Replica

    started_ray = not ray.is_initialized()
    if started_ray:
        _init_ray(scaling)
    serve.start(proxy_location="Disabled")
    deployment = serve.deployment(Replica, name="Replica", **replica_options(scaling, prefix_routing,
                                                                              imbalance_threshold))
    handle = serve.run(deployment.bind(spec, scaling.threads_per_replica), name=app_name, route_prefix=None)
    tokenizer, block_size = handle.routing_info.remote().result()
    app, drain = build_ingress(handle, spec.name, spec.settings, tokenizer if prefix_routing else None, block_size)

    def shutdown() -> None:
        if started_ray:  # the local Ray goes, and its replicas with it (even when part of it died first)
            ray.shutdown()
        else:
            serve.delete(app_name)

    return RayDeployment(app, drain, handle, shutdown)


def replica_options(scaling: ReplicaScaling, prefix_routing: bool, imbalance_threshold: int) -> dict:
    """serve.deployment's options for the replicas."""
    threads = scaling.threads_per_replica
    options = {
        "ray_actor_options": {"num_cpus": threads,
                              "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads), **_pythonpath()}}},
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
    }
    if scaling.is_autoscaling:
        options["autoscaling_config"] = autoscaling_config(scaling.min_replicas, scaling.max_replicas,
                                                           scaling.num_replicas)
    else:
        options["num_replicas"] = scaling.num_replicas
    if prefix_routing:
        from ownllm.ray_serve.router import PrefixAwareRouter

        options["request_router_config"] = {"request_router_class": PrefixAwareRouter,
                                            "request_router_kwargs": {"imbalance_threshold": imbalance_threshold}}
    return options


def _init_ray(scaling: ReplicaScaling) -> None:
    import ray

    if scaling.ray_address is not None:
        ray.init(address=scaling.ray_address, runtime_env={"env_vars": _pythonpath()})
        return
    most = scaling.max_replicas if scaling.is_autoscaling else scaling.num_replicas
    ray.init(num_cpus=most * scaling.threads_per_replica, include_dashboard=False,
             runtime_env={"env_vars": _pythonpath()}, logging_level=logging.WARNING)


def _pythonpath() -> dict[str, str]:
    """This process's PYTHONPATH for Ray's workers (a source checkout run without installing)."""
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
