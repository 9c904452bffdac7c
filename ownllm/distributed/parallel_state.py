"""This process's tensor-parallel group: its rank and size, and the two collectives the parallel layers call.

A process holds one group for its life: the single-process default (size 1, no collectives), or, in a worker
process, the one made by init_tensor_parallel before the model is built. The layers read it as they are
constructed (layers/parallel.py), so a size-1 model is built from plain layers and pays nothing. The group is
a process-wide setting made once, like vLLM's; nothing per step lives here but the all-reduce timer, which
the benchmark reads.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    communication_seconds: float = field(default=0.0)  # time in collectives since the last reset
    num_collectives: int = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks, in place; x: any shape."""
        started = time.perf_counter()
        dist.all_reduce(x)
        self._count(started)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] on every rank -> [N, size * D], rank r's columns r*D:(r+1)*D."""
        started = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        self._count(started)
        return torch.cat(parts, dim=-1)

    def min(self, value: int) -> int:
        """The smallest of an integer over the ranks (e.g. the KV blocks every rank has room for)."""
        if self.size == 1:
            return value
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"  # NCCL: CUDA only
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def _count(self, started: float) -> None:
        self.communication_seconds += time.perf_counter() - started
        self.num_collectives += 1


_group = TensorParallelGroup()


def tp_group() -> TensorParallelGroup:
    return _group


def init_tensor_parallel(rank: int, size: int, init_method: str, backend: str, timeout_s: float) -> None:
    """Joins the group of `size` ranks (gloo on the CPU, nccl on CUDA); a collective that waits longer than
    timeout_s for a peer raises instead of hanging."""
    global _group
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _group = TensorParallelGroup(rank, size)


def divide(total: int, size: int, what: str) -> int:
    """total / size, or a one-line error naming both numbers."""
    if total % size:
        raise ValueError(f"tensor parallel size {size} does not divide the model's {total} {what}")
    return total // size
