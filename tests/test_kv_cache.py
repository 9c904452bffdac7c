"""The KV-cache block manager: exact block ids, reference counts, prefix-cache hits and LRU eviction order."""

from __future__ import annotations

import sys

import pytest

from ownllm.engine.kv_cache import KVCacheManager, hash_block


def test_imports_no_torch():
    import subprocess

    code = ("import sys, ownllm.engine.kv_cache, ownllm.engine.scheduler, ownllm.engine.encoder_cache, "
            "ownllm.multimodal.registry, ownllm.multimodal.llava; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_allocation_takes_blocks_in_order_and_free_returns_uncached_ones_to_the_head():
    """Blocks that hold no cached prefix are reused first (their memory is warm), in their chain's order."""
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert kv.allocate("a", 10)  # 3 blocks
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.allocate("b", 4)
    assert kv.block_ids("b") == [3]
    assert kv.allocate("a", 13)  # grows by one block
    assert kv.block_ids("a") == [0, 1, 2, 4]
    assert kv.num_free_blocks == 3
    kv.free("a")
    assert list(kv.pool.free_queue) == [0, 1, 2, 4, 5, 6, 7]  # a's blocks before the never-used ones
    assert [kv.pool.blocks[i].ref_cnt for i in range(8)] == [0, 0, 0, 1, 0, 0, 0, 0]
    assert kv.allocate("c", 8) and kv.block_ids("c") == [0, 1]


def test_free_returns_cached_blocks_to_the_tail_tail_first():
    """Blocks holding a cached prefix join the LRU end, the tail of a chain evicted first; the partial last block
    (no hash) is reused first."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate("a", 10)  # blocks 0, 1 full, 2 partial
    kv.cache_full_blocks("a", list(range(10)), 10)
    kv.free("a")
    assert list(kv.pool.free_queue) == [2, 3, 4, 5, 6, 7, 1, 0]


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate("a", 12)
    assert not kv.allocate("b", 8)
    assert kv.block_ids("b") == [] and kv.num_free_blocks == 1


def test_prefix_hit_shares_blocks_with_reference_counts():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    prompt = list(range(10))  # two full blocks and a partial one
    assert kv.find_cached_prefix(prompt) == ([], 0)
    assert kv.allocate("a", len(prompt))
    kv.cache_full_blocks("a", prompt, len(prompt))
    assert [kv.pool.blocks[i].block_hash for i in (0, 1, 2)] == [
        hash_block(None, [0, 1, 2, 3]), hash_block(hash_block(None, [0, 1, 2, 3]), [4, 5, 6, 7]), None]
    blocks, num_cached = kv.find_cached_prefix(prompt + [99])
    assert [b.block_id for b in blocks] == [0, 1] and num_cached == 8
    assert kv.allocate("b", 11, blocks)
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    kv.free("a")
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2)] == [1, 1, 0]


def test_the_last_prompt_token_is_never_served_from_cache():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    prompt = list(range(8))
    kv.allocate("a", 8)
    kv.cache_full_blocks("a", prompt, 8)
    assert kv.find_cached_prefix(prompt)[1] == 4  # block 2 would leave nothing to compute
    assert kv.find_cached_prefix(prompt + [8])[1] == 8


def test_different_prefix_misses_even_with_equal_block():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    kv.allocate("a", 4)
    kv.cache_full_blocks("a", [1, 2, 3, 4], 4)
    assert kv.find_cached_prefix([9, 9, 3, 4, 5])[1] == 0  # block [3, 4] hashes with its parent
    assert kv.find_cached_prefix([1, 2, 9, 9, 5])[1] == 2


def test_cached_blocks_nobody_uses_are_evicted_least_recently_used_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    for rid, tokens in (("a", [1, 2]), ("b", [3, 4])):
        kv.allocate(rid, 2)
        kv.cache_full_blocks(rid, tokens, 2)
    kv.free("a")  # block 0 freed first: least recently used
    kv.free("b")  # block 1
    assert list(kv.pool.free_queue) == [2, 3, 0, 1]
    assert kv.allocate("c", 6)  # takes 2, 3 and then evicts block 0 (a's), keeping b's
    assert kv.block_ids("c") == [2, 3, 0]
    assert kv.find_cached_prefix([1, 2, 0])[1] == 0
    assert kv.find_cached_prefix([3, 4, 0])[1] == 2


def test_hit_on_a_free_cached_block_revives_it_and_counts_against_free_space():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    kv.allocate("a", 4)
    kv.cache_full_blocks("a", [1, 2, 3, 4], 4)
    kv.free("a")
    blocks, n = kv.find_cached_prefix([1, 2, 3, 4, 5])
    assert n == 4
    assert not kv.allocate("b", 7, blocks)  # would need 2 fresh blocks besides the 2 revived: only 1 left
    assert kv.allocate("b", 5, blocks)
    assert kv.block_ids("b") == [0, 1, 2] and kv.num_free_blocks == 0
    assert [b.ref_cnt for b in kv.pool.blocks] == [1, 1, 1]


def test_pool_needs_a_block():
    with pytest.raises(ValueError, match="at least one block"):
        KVCacheManager(num_blocks=0, block_size=16)
