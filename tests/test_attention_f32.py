"""The float32 paged attention kernel (kernels/attention_f32.cpp): query rows over a paged cache against float64
attention on the gathered keys (causal, sliding window, grouped heads), and each row's numbers the same alone as
among other rows (a decode batch, a prompt's rows)."""

from __future__ import annotations

import pytest
import torch

from ownllm.kernels.build import avx2_kernels, cpu_has_avx2


@pytest.fixture(scope="module")
def kernel():
    if not cpu_has_avx2():
        pytest.skip("attention_f32 needs AVX2 and FMA")
    module = avx2_kernels("attention_f32")
    assert module is not None, "attention_f32 failed to build (see the log)"
    return module


def paged(seq_lens: list[int], block_size: int, kv_heads: int, head_dim: int, seed: int):
    """A cache holding random keys and values of each sequence in shuffled blocks -> (k_cache, v_cache, tables,
    the keys and values of each sequence [S, KVH, D])."""
    torch.manual_seed(seed)
    counts = [-(-n // block_size) for n in seq_lens]
    order = torch.randperm(sum(counts) + 3)  # 3 blocks nobody uses
    k_cache = torch.randn(len(order), block_size, kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    tables = torch.zeros(len(seq_lens), max(counts), dtype=torch.int32)
    start, keys = 0, []
    for i, (n, c) in enumerate(zip(seq_lens, counts)):
        tables[i, :c] = order[start : start + c].to(torch.int32)
        start += c
        keys.append((k_cache[tables[i, :c].long()].flatten(0, 1)[:n], v_cache[tables[i, :c].long()].flatten(0, 1)[:n]))
    return k_cache, v_cache, tables, keys


def reference(q, keys, values, position: int, scale: float, window: int) -> torch.Tensor:
    """q [H, D] at `position` -> [H, D], float64."""
    first = max(0, position + 1 - window) if window else 0
    k, v = keys[first : position + 1].double(), values[first : position + 1].double()  # [S, KVH, D]
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [S, H, D]
    scores = torch.einsum("hd,shd->hs", q.double(), k) * scale
    return torch.einsum("hs,shd->hd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("head_dim", [64, 40, 12])
def test_decode_rows_and_prompt_rows_against_float64(kernel, head_dim, window):
    heads, kv_heads, block_size, scale = 6, 2, 4, head_dim**-0.5
    seq_lens = [1, 9, 17, 4]
    k_cache, v_cache, tables, keys = paged(seq_lens, block_size, kv_heads, head_dim, seed=head_dim + window)
    q = torch.randn(len(seq_lens), heads, head_dim)
    positions = torch.tensor([n - 1 for n in seq_lens])
    decode = kernel.paged_attention_f32(q, k_cache, v_cache, tables, positions, scale, window)
    for i, n in enumerate(seq_lens):
        expected = reference(q[i], *keys[i], n - 1, scale, window)
        assert torch.allclose(decode[i].double(), expected, atol=1e-5, rtol=1e-5)
        alone = kernel.paged_attention_f32(q[i : i + 1], k_cache, v_cache, tables[i : i + 1], positions[i : i + 1],
                                           scale, window)
        assert torch.equal(alone[0], decode[i])  # batch-invariant
    # a prompt: every row of sequence 2 at once, one table shared; its last row is the decode row above
    rows = torch.randn(seq_lens[2], heads, head_dim)
    rows[-1] = q[2]
    prompt = kernel.paged_attention_f32(rows, k_cache, v_cache, tables[2:3], torch.arange(seq_lens[2]), scale, window)
    for p in range(seq_lens[2]):
        assert torch.allclose(prompt[p].double(), reference(rows[p], *keys[2], p, scale, window), atol=1e-5, rtol=1e-5)
    assert torch.equal(prompt[-1], decode[2])


def test_bad_input_is_refused_by_name(kernel):
    k_cache, v_cache, tables, _ = paged([5], 4, 2, 8, seed=0)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.paged_attention_f32(torch.zeros(1, 2, 8, dtype=torch.bfloat16), k_cache, v_cache, tables,
                                   torch.tensor([4]), 1.0, 0)
    with pytest.raises(RuntimeError, match="position 8 beyond"):
        kernel.paged_attention_f32(torch.zeros(1, 2, 8), k_cache, v_cache, tables, torch.tensor([8]), 1.0, 0)
