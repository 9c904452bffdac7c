"""ModelRunner: a SchedulerOutput in, sampled tokens out. Owns the model weights and the KV-cache pool.

Each step it flattens the scheduled requests' new tokens into one batch (token ids, positions,
cache slots, block tables), runs the model once, takes the logits of each request that finishes
its scheduled tokens this step and samples them. Results are plain Python values, so the engine
above it never touches a tensor.
"""

from __future__ import annotations

import logging

import torch

from ownllm.config import CacheConfig, ModelConfig
from ownllm.layers.attention import AttentionMetadata, PagedKVCache
from ownllm.loader import Checkpoint
from ownllm.models.registry import model_class
from ownllm.outputs import SchedulerOutput
from ownllm.worker.sampler import SampleResult, Sampler

logger = logging.getLogger(__name__)
DEFAULT_KV_CACHE_BYTES = 2 * 2**30


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


class ModelRunner:
    """device: "cpu", or a CUDA device, where the weights, the KV pool and each step's tensors live; on a GPU
    only the plain-torch paths run (the kernels are CPU code)."""

    def __init__(self, checkpoint: Checkpoint, cache_config: CacheConfig | None = None,
                 eos_token_ids: list[int] | None = None, max_num_seqs: int = 64, device: str = "cpu") -> None:
        self.config: ModelConfig = checkpoint.config
        self.cache_config = cache_config or CacheConfig()
        self.dtype = getattr(torch, self.config.dtype)
        self.device = device
        cls = model_class(self.config.architecture)
        self.model = cls.from_tensors(self.config, checkpoint.tensors)
        if torch.device(device).type != "cpu":
            self.model.to(device)
        self.sampler = Sampler(eos_token_ids or [], device)
        self.kv_spec = cls.kv_cache_spec(self.config)
        self.block_size = self.cache_config.block_size
        self.num_blocks = self._num_blocks(max_num_seqs)
        self.kv_cache = PagedKVCache(self.kv_spec, self.num_blocks, self.block_size, self.dtype, device)

    def _num_blocks(self, max_num_seqs: int) -> int:
        """From the memory budget; without an explicit one, no more than max_num_seqs full contexts need."""
        cc = self.cache_config
        if cc.num_blocks is not None:
            return cc.num_blocks
        per_block = self.kv_spec.bytes_per_token(self.dtype) * cc.block_size
        if cc.memory_bytes:
            num_blocks = cc.memory_bytes // per_block
        else:
            budget = min(DEFAULT_KV_CACHE_BYTES, int(available_memory_bytes() * cc.memory_fraction))
            num_blocks = min(budget // per_block, max_num_seqs * -(-self.config.max_model_len // cc.block_size))
        if num_blocks < 1:
            raise ValueError(f"the KV cache memory holds no block of {per_block} bytes; give it more memory")
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, cc.block_size, num_blocks * per_block / 2**30)
        return num_blocks

    def _metadata(self, output: SchedulerOutput) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        token_ids, positions, slots, query_start_loc, seq_lens, last_index = [], [], [], [0], [], []
        bs = self.block_size
        for request, num_new, table in zip(output.requests, output.num_tokens, output.block_tables):
            start = request.num_computed_tokens
            token_ids += request.all_token_ids[start : start + num_new]
            span = range(start, start + num_new)
            positions += span
            slots += [table[p // bs] * bs + p % bs for p in span]
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(start + num_new)
            last_index.append(query_start_loc[-1] - 1)
        max_blocks = max(len(t) for t in output.block_tables)
        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        tables = tensor([t + [0] * (max_blocks - len(t)) for t in output.block_tables])
        meta = AttentionMetadata(tensor(positions), tensor(slots), query_start_loc, seq_lens, tables, self.kv_cache)
        return tensor(token_ids), meta, last_index

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> dict[str, SampleResult]:
        input_ids, meta, last_index = self._metadata(output)
        hidden = self.model(input_ids, meta)  # [T, hidden]
        rows = [i for i, s in enumerate(output.samples) if s]
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[[last_index[i] for i in rows]]).float()  # [R, vocab]
        requests = [output.requests[i] for i in rows]
        return {r.request_id: result for r, result in zip(requests, self.sampler(logits, requests))}

    def free(self, request_id: str) -> None:
        self.sampler.free(request_id)
