"""One forward's flat batch from sequences' spans: token ids, positions, cache slots and block tables.

Shared by the model runner and the draft model, which write the same paged layout into their own pools.
A span computed as decode rows (drafts being verified) becomes one single-token sequence per position,
each seeing the cache up to itself: the same attention call a plain decode step makes, so a verified
token gets the numbers it would get decoded alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ownllm.layers.attention import AttentionMetadata, PagedKVCache, TorchAttention


@dataclass
class Span:
    token_ids: list[int]  # the tokens computed, at positions start, start + 1, ...
    start: int
    block_ids: list[int]
    as_decode_rows: bool = False
    bidirectional: list[tuple[int, int]] | None = None  # position ranges attended both ways (AttentionMetadata)


def build_inputs(spans: list[Span], kv_cache: PagedKVCache, backend: TorchAttention,
                 device) -> tuple[torch.Tensor, AttentionMetadata]:
    """-> (input ids [T], metadata); span i's tokens are rows query_start_loc[i]... in order."""
    token_ids, positions, slots, query_start_loc, seq_lens, tables = [], [], [], [0], [], []
    bidirectional = {}
    bs = kv_cache.block_size
    for span in spans:
        num = len(span.token_ids)
        token_ids += span.token_ids
        span_positions = range(span.start, span.start + num)
        positions += span_positions
        slots += [span.block_ids[p // bs] * bs + p % bs for p in span_positions]
        if span.as_decode_rows:
            for p in span_positions:
                query_start_loc.append(query_start_loc[-1] + 1)
                seq_lens.append(p + 1)
                tables.append(span.block_ids)
        else:
            if span.bidirectional:
                bidirectional[len(seq_lens)] = span.bidirectional
            query_start_loc.append(query_start_loc[-1] + num)
            seq_lens.append(span.start + num)
            tables.append(span.block_ids)
    max_blocks = max(len(t) for t in tables)

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    block_tables = tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    meta = AttentionMetadata(tensor(positions), tensor(slots), query_start_loc, seq_lens, block_tables, kv_cache,
                             backend, bidirectional or None)
    return tensor(token_ids), meta
