"""The bf16 many-query attention kernel (kernels/prefill_attention.cpp) against the float32 SDPA path it
replaces, in mixed batches of prompts, prompt chunks after cached prefixes, and single decodes."""

from __future__ import annotations

import pytest
import torch

import ownllm.layers.attention as attention_module
from ownllm import LLM, SamplingParams
from ownllm.kernels.build import prefill_attention_kernel
from ownllm.layers.attention import Attention, AttentionMetadata, KVCacheSpec, PagedKVCache
from tests.checkpoints import assert_same_generations, build_checkpoint, random_prompts
from tests.kernel_modules import built_kernel
from tests.test_decode_ops import assert_rounded_alike


@pytest.fixture(scope="module")
def kernel():
    return built_kernel(lambda: prefill_attention_kernel(torch.zeros(1, dtype=torch.bfloat16)), "the prompt attention kernel")


def prefill_batch(spans: list[tuple[int, int]], num_kv_heads: int, head_dim: int, block_size: int = 16):
    """Sequences of (cached tokens, new tokens): random cache contents, blocks scattered through the pool."""
    num_blocks = sum(-(-(c + n) // block_size) for c, n in spans) + 3
    cache = PagedKVCache(KVCacheSpec(2, num_kv_heads, head_dim, head_dim), num_blocks, block_size, torch.bfloat16)
    cache.k.normal_()
    cache.v.normal_()
    order = torch.randperm(num_blocks).tolist()
    tables, positions, slots, starts = [], [], [], [0]
    for cached, new in spans:
        table = [order.pop() for _ in range(-(-(cached + new) // block_size))]
        tables.append(table)
        positions += range(cached, cached + new)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
        starts.append(starts[-1] + new)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(torch.tensor(positions), torch.tensor(slots), starts, [c + n for c, n in spans],
                             torch.tensor([t + [0] * (width - len(t)) for t in tables]), cache)
    return cache, meta


SPANS = [(0, 37), (20, 15), (100, 1), (0, 130), (64, 64), (3, 2)]


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(32, 8, 64), (9, 3, 64), (4, 4, 128), (8, 2, 96)])
@pytest.mark.parametrize("window, chunk", [(None, None), (20, None), (None, 32)])
def test_prefill_attention_matches_sdpa(kernel, monkeypatch, num_heads, num_kv_heads, head_dim, window, chunk):
    torch.manual_seed(head_dim + num_heads)
    cache, meta = prefill_batch(SPANS, num_kv_heads, head_dim)
    attn = Attention(num_heads, num_kv_heads, head_dim, head_dim**-0.5, layer_idx=1, sliding_window=window,
                     chunk_size=chunk)
    tokens = meta.positions.shape[0]
    q = torch.randn(tokens, num_heads, head_dim).bfloat16()
    k = torch.randn(tokens, num_kv_heads, head_dim).bfloat16()
    v = torch.randn(tokens, num_kv_heads, head_dim).bfloat16()
    calls = []
    monkeypatch.setattr(attention_module, "prefill_attention_kernel", lambda x: calls.append(x) or kernel)
    out = attn(q, k, v, meta)
    assert len(calls) == len(SPANS)  # each sequence went through the kernel
    monkeypatch.setattr(attention_module, "prefill_attention_kernel", lambda x: None)
    expected = attn(q, k, v, meta)  # the same keys and values, written again
    assert_rounded_alike(out, expected)


def test_queries_strided_as_the_qkv_split_leaves_them(kernel):
    """q as a view of a fused qkv row (position stride wider than heads x head_dim), GQA, keys after an offset."""
    torch.manual_seed(0)
    qkv = torch.randn(40, (6 + 2 + 2) * 64).bfloat16()
    q = qkv[:, : 6 * 64].reshape(40, 6, 64)
    keys, values = torch.randn(50, 2, 64).bfloat16(), torch.randn(50, 2, 64).bfloat16()
    positions = torch.arange(17, 57)  # keys at positions 7..56
    out = kernel.prefill_attention(q, keys, values, positions, 7, 0.125, 0, 0)
    mask = torch.arange(7, 57)[None, :] <= positions[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.contiguous().transpose(0, 1).float(), keys.transpose(0, 1).float(), values.transpose(0, 1).float(),
        attn_mask=mask, scale=0.125, enable_gqa=True).transpose(0, 1).reshape(40, -1).bfloat16()
    assert_rounded_alike(out, expected)


def test_key_and_value_sizes_may_differ(kernel):
    """MLA's expanded attention: keys of nope + rope dims (192 for DeepSeek-V3), values of 128, one kv head a head."""
    torch.manual_seed(1)
    q, keys, values = torch.randn(30, 4, 192).bfloat16(), torch.randn(30, 4, 192).bfloat16(), torch.randn(30, 4, 128).bfloat16()
    positions = torch.arange(30)
    out = kernel.prefill_attention(q, keys, values, positions, 0, 192**-0.5, 0, 0)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).float(), keys.transpose(0, 1).float(), values.transpose(0, 1).float(), is_causal=True,
        scale=192**-0.5).transpose(0, 1).reshape(30, -1).bfloat16()
    assert_rounded_alike(out, expected)


def test_mla_prompts_through_the_kernel(kernel, monkeypatch, tmp_path):
    """A DeepSeek-V3 model in bfloat16, MLA expanded: the kernel gives the torch path's generations."""
    build_checkpoint(tmp_path, "DeepseekV3ForCausalLM", num_hidden_layers=2, num_key_value_heads=4,
                     n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                     q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                     moe_intermediate_size=32)
    llm = LLM(str(tmp_path), dtype="bfloat16", enable_prefix_caching=False, mla_backend="expanded")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    calls = []
    monkeypatch.setattr(attention_module, "prefill_attention_kernel", lambda x: calls.append(x) or kernel)
    ours = [o.outputs[0] for o in llm.generate(random_prompts((9, 40)), params)]
    assert calls
    monkeypatch.setattr(attention_module, "prefill_attention_kernel", lambda x: None)
    reference = [o.outputs[0] for o in llm.generate(random_prompts((9, 40)), params)]
    assert_same_generations(ours, reference, atol=0.02)  # attention outputs a bf16 ulp apart, at most


def test_a_query_without_its_key_is_a_named_error(kernel):
    q, keys = torch.zeros(2, 2, 64).bfloat16(), torch.zeros(4, 1, 64).bfloat16()
    with pytest.raises(RuntimeError, match="query position 9 has no key"):
        kernel.prefill_attention(q, keys, keys, torch.tensor([3, 9]), 0, 0.125, 0, 0)
