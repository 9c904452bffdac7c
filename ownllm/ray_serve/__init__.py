"""Replicas on Ray Serve (the `ownllm[ray]` extra): several engines, each in its own process, behind one ingress.

`ownllm serve --replicas N` (or --min-replicas/--max-replicas, --ray-address) lands here. This package owns how
replicas are asked for (ReplicaScaling, importable without Ray so the CLI checks options first), the replica
deployment (replica.py), the ingress that forwards requests to them (ingress.py), prefix-aware routing
(prefix_key.py, prefix_policy.py, router.py), autoscaling (autoscaling.py) and the per-replica metrics
(metrics.py); deploy.py wires them. Nothing outside this package imports Ray.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

RAY_EXTRA_HINT = "pip install 'ownllm[ray]'"


def require_ray(option: str) -> None:
    """One line naming the extra when Ray Serve is not installed."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise ValueError(f"{option} needs Ray Serve, which is not installed: {RAY_EXTRA_HINT}")


@dataclass(frozen=True)
class ReplicaScaling:
    """How many replicas, where, and with how many threads each. min/max set: autoscaled, starting at
    num_replicas."""

    num_replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    ray_address: str | None = None
    threads_per_replica: int = 1

    @property
    def is_autoscaling(self) -> bool:
        return self.min_replicas is not None

    @classmethod
    def of(cls, replicas: int | None, min_replicas: int | None, max_replicas: int | None, ray_address: str | None,
           threads_per_replica: int | None) -> ReplicaScaling:
        """From the CLI's options, checked (bad combinations raise ValueError naming the options)."""
        require_ray("--replicas" if replicas is not None else "--min-replicas" if min_replicas is not None else
                    "--max-replicas" if max_replicas is not None else "--ray-address")
        if (min_replicas is None) != (max_replicas is None):
            raise ValueError("autoscaling needs both --min-replicas and --max-replicas")
        if min_replicas is not None and min_replicas > max_replicas:
            raise ValueError(f"--min-replicas ({min_replicas}) is more than --max-replicas ({max_replicas})")
        if replicas is not None and min_replicas is not None and not min_replicas <= replicas <= max_replicas:
            raise ValueError(f"--replicas ({replicas}) must lie between --min-replicas ({min_replicas}) and "
                             f"--max-replicas ({max_replicas})")
        start = replicas if replicas is not None else min_replicas if min_replicas is not None else 1
        return cls(start, min_replicas, max_replicas, ray_address, threads_per_replica or 1)

    def describe(self) -> str:
        count = (f"{self.min_replicas}-{self.max_replicas} replicas (autoscaled)" if self.is_autoscaling else
                 f"{self.num_replicas} replica{'s' if self.num_replicas > 1 else ''}")
        return f"{count}, {self.threads_per_replica} thread{'s' if self.threads_per_replica > 1 else ''} each"
