"""KV-cache bookkeeping: fixed-size blocks with reference counts, and automatic prefix caching.

Pure Python, no torch: the data plane owns the tensors, this owns which block holds what.
A full block is identified by a hash of (its parent block's hash, its token ids, and the content hashes of
the images whose placeholder tokens it covers), so equal prefixes map to equal hash chains, and equal text
with different images does not. Freed blocks go to the tail of the free queue but keep their
hash until reallocated, so the free queue is the LRU eviction order: allocation takes from the
head, evicting the least recently used cached block first. Freed blocks that hold no cached prefix go
to the head instead, the last one freed first: their memory is warm, where a block never used yet costs
page faults on the CPU (the pool's pages are mapped on first touch). Never imports torch or the model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and registered in the prefix cache


ImageSpan = tuple[int, int, str]  # (offset, length, content hash) of an image's placeholder tokens


def hash_block(parent_hash: int | None, token_ids: Sequence[int], image_hashes: tuple[str, ...] = ()) -> int:
    if image_hashes:
        return hash((parent_hash, tuple(token_ids), image_hashes))
    return hash((parent_hash, tuple(token_ids)))


def images_in(image_spans: Sequence[ImageSpan], start: int, end: int) -> tuple[str, ...]:
    """The hashes of the images with placeholder tokens in [start, end)."""
    return tuple(h for offset, length, h in image_spans if offset < end and offset + length > start)


def block_hash_at(parent: int | None, token_ids: Sequence[int], i: int, block_size: int,
                  image_spans: Sequence[ImageSpan] = ()) -> int:
    """The hash of token_ids' i-th full block, chained to its parent's, with the images it covers mixed in."""
    start, end = i * block_size, (i + 1) * block_size
    return hash_block(parent, token_ids[start:end], images_in(image_spans, start, end))


def prefix_hashes(token_ids: Sequence[int], block_size: int, num_full_blocks: int,
                  image_spans: Sequence[ImageSpan] = ()) -> list[int]:
    """The hash chain of the first num_full_blocks full blocks of token_ids (equal prefixes with equal images,
    equal chains): what the prefix cache looks blocks up by, and what Ray Serve's prefix-aware router hashes."""
    hashes, parent = [], None
    for i in range(num_full_blocks):
        parent = block_hash_at(parent, token_ids, i, block_size, image_spans)
        hashes.append(parent)
    return hashes


class BlockPool:
    """All blocks, the free queue (LRU order) and the hash -> cached block map."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, count: int) -> list[Block]:
        if count > self.num_free:
            raise MemoryError(f"asked for {count} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(count):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:  # evict it from the prefix cache
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Sequence[Block]) -> None:
        """Takes a reference on cached blocks (a prefix-cache hit), pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Sequence[Block]) -> None:
        """Drops a reference; blocks nobody holds join the free queue: its tail (the most recently used end) when
        they hold a cached prefix, else its head (reused first)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def register(self, block: Block, block_hash: int) -> None:
        block.block_hash = block_hash
        self.cached.setdefault(block_hash, block)


class KVCacheManager:
    """Per-request block lists on top of a BlockPool; counts prefix-cache queries and hits in tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_hashes: dict[str, list[int]] = {}  # hashes of the request's full blocks, in order
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.pool.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def find_cached_prefix(self, token_ids: Sequence[int], image_spans: Sequence[ImageSpan] = (),
                           hashes: Sequence[int] | None = None) -> tuple[list[Block], int]:
        """Cached blocks for the longest cached prefix of token_ids -> (blocks, tokens they hold).
        At least the last token is always left to compute, since its logits are needed. hashes: token_ids'
        lookup_hashes, when the caller has them."""
        if not self.enable_prefix_caching:
            return [], 0
        blocks = []
        for block_hash in self.lookup_hashes(token_ids, image_spans) if hashes is None else hashes:
            block = self.pool.cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def lookup_hashes(self, token_ids: Sequence[int], image_spans: Sequence[ImageSpan] = ()) -> list[int]:
        """The hash chain of the full blocks of token_ids a prefix-cache lookup may match (all but the last
        token's); none without prefix caching."""
        if not self.enable_prefix_caching:
            return []
        return prefix_hashes(token_ids, self.block_size, (len(token_ids) - 1) // self.block_size, image_spans)

    def allocate(self, request_id: str, num_tokens: int, cached_blocks: Sequence[Block] = ()) -> bool:
        """Makes the request's blocks cover num_tokens tokens, first adopting cached_blocks (new requests
        only). Returns False, changing nothing, when the free blocks do not suffice."""
        blocks = self.req_blocks.get(request_id, [])
        have = len(blocks) + len(cached_blocks)
        need = max(0, -(-num_tokens // self.block_size) - have)
        evictable_hits = sum(1 for b in cached_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free - evictable_hits:
            return False
        self.pool.touch(cached_blocks)
        self.req_blocks[request_id] = blocks + list(cached_blocks) + self.pool.allocate(need)
        return True

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                          image_spans: Sequence[ImageSpan] = ()) -> None:
        """Registers the request's blocks that are now full of computed tokens in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self.req_hashes.setdefault(request_id, [])
        num_full = num_computed_tokens // self.block_size
        blocks = self.req_blocks[request_id]
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_full):
            parent = block_hash_at(parent, token_ids, i, self.block_size, image_spans)
            hashes.append(parent)
            if blocks[i].block_hash is None:
                self.pool.register(blocks[i], parent)

    def free(self, request_id: str) -> None:
        """Releases every block of the request, last block first, so a prefix's tail is evicted before its head."""
        blocks = self.req_blocks.pop(request_id, [])
        self.req_hashes.pop(request_id, None)
        self.pool.release(list(reversed(blocks)))

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_query_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens
