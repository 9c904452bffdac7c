"""The fused bf16 decode ops (kernels/decode_ops.cpp) against the plain-torch paths they replace."""

from __future__ import annotations

import pytest
import torch

import ownllm.layers.attention as attention_module
import ownllm.layers.mlp as mlp_module
import ownllm.layers.norm as norm_module
import ownllm.layers.rotary as rotary_module
from ownllm.kernels.build import decode_ops
from ownllm.layers.attention import Attention, AttentionMetadata, KVCacheSpec, PagedKVCache
from ownllm.layers.norm import RMSNorm
from ownllm.layers.rotary import RotaryEmbedding
from tests.kernel_modules import built_kernel


@pytest.fixture(scope="module")
def ops():
    return built_kernel(lambda: decode_ops(torch.zeros(1, dtype=torch.bfloat16)), "the bf16 decode ops")


@pytest.fixture
def reference(monkeypatch):
    """Runs a callable with every layer on its plain-torch path."""

    def run(fn, *args):
        with monkeypatch.context() as m:
            for module in (attention_module, mlp_module, norm_module, rotary_module):
                m.setattr(module, "decode_ops", lambda x: None)
            return fn(*args)

    return run


def assert_rounded_alike(out: torch.Tensor, expected: torch.Tensor, min_equal: float = 0.99) -> None:
    """Same roundings as the reference: nearly every element bit-equal, the rest one bf16 ulp away."""
    assert out.shape == expected.shape and out.dtype == expected.dtype == torch.bfloat16
    assert (out == expected).float().mean() >= min_equal
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("rows, dim", [(1, 576), (3, 2048), (40, 100), (2, 7)])
def test_rms_norm(ops, reference, rows, dim):
    torch.manual_seed(dim)
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = torch.randn(dim).bfloat16()
    x = (torch.randn(rows, dim) * 3).bfloat16()
    assert_rounded_alike(norm(x), reference(norm, x))


def test_rms_norm_of_heads(ops, reference):
    """qk-norm: per-head, on a [T, heads, head_dim] view cut out of a wider qkv row."""
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64).bfloat16()
    q = torch.randn(5, 12 * 64).bfloat16()[:, : 8 * 64].reshape(5, 8, 64)
    assert_rounded_alike(norm(q), reference(norm, q))


@pytest.mark.parametrize("head_dim", [64, 128, 48, 20])
def test_rope_rotate_half_in_place_on_qkv_views(ops, reference, head_dim):
    torch.manual_seed(head_dim)
    rope = RotaryEmbedding(head_dim, 500000.0, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    positions = torch.tensor([0, 7, 300, 5000])
    qkv = torch.randn(4, (6 + 2 + 2) * head_dim).bfloat16()

    def views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # q and k as the qkv split leaves them
        return t[:, : 6 * head_dim].reshape(4, 6, head_dim), t[:, 6 * head_dim : 8 * head_dim].reshape(4, 2, head_dim)

    expected_q, expected_k = reference(rope, positions, *views(qkv.clone()))
    rope._cached = None
    q, k = rope(positions, *views(qkv))
    assert_rounded_alike(q, expected_q, min_equal=1.0)
    assert_rounded_alike(k, expected_k, min_equal=1.0)


@pytest.mark.parametrize("rows, intermediate", [(1, 1536), (3, 8192), (2, 37)])
def test_silu_mul(ops, rows, intermediate):
    torch.manual_seed(intermediate)
    gate_up = (torch.randn(rows, 2 * intermediate) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    assert_rounded_alike(ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)


def paged_batch(context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int = 16):
    """Random cache contents, each sequence's blocks scattered through the pool; the decode metadata."""
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    cache = PagedKVCache(KVCacheSpec(2, num_kv_heads, head_dim, head_dim), num_blocks, block_size, torch.bfloat16)
    cache.k.normal_()
    cache.v.normal_()
    order = torch.randperm(num_blocks).tolist()
    tables, slots = [], []
    for n in context_lens:
        tables.append([order.pop() for _ in range(-(-n // block_size))])
        slots.append(tables[-1][(n - 1) // block_size] * block_size + (n - 1) % block_size)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        torch.tensor([n - 1 for n in context_lens]), torch.tensor(slots), list(range(len(context_lens) + 1)),
        context_lens, torch.tensor([t + [0] * (width - len(t)) for t in tables]), cache,
    )
    return cache, meta


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(32, 8, 64), (9, 3, 64), (4, 4, 128), (2, 1, 40)])
@pytest.mark.parametrize("window, chunk", [(None, None), (20, None), (None, 32)])
def test_paged_decode_attention(ops, reference, num_heads, num_kv_heads, head_dim, window, chunk):
    torch.manual_seed(head_dim + num_heads)
    context_lens = [1, 17, 100, 64, 33, 300]  # over 64 tokens: split across work items, then merged
    cache, meta = paged_batch(context_lens, num_kv_heads, head_dim)
    attn = Attention(num_heads, num_kv_heads, head_dim, head_dim**-0.5, layer_idx=1, sliding_window=window,
                     chunk_size=chunk)
    q = torch.randn(len(context_lens), num_heads, head_dim).bfloat16()
    k = torch.randn(len(context_lens), num_kv_heads, head_dim).bfloat16()
    v = torch.randn(len(context_lens), num_kv_heads, head_dim).bfloat16()
    before = cache.k.clone(), cache.v.clone()
    expected = reference(attn, q, k, v, meta)
    expected_cache = cache.k.clone(), cache.v.clone()
    cache.k.copy_(before[0])
    cache.v.copy_(before[1])
    out = attn(q, k, v, meta)
    assert torch.equal(cache.k, expected_cache[0]) and torch.equal(cache.v, expected_cache[1])
    assert not torch.equal(cache.k, before[0])  # the new keys were written
    # float32 math in both, one rounding at the end: a bf16 ulp apart at most
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=2e-3)
