"""The CPU kernels and the fast paths built on them, against plain torch and against transformers in bfloat16."""

from __future__ import annotations

import pytest
import torch

from ownllm.kernels.build import cpu_has_bf16
from ownllm.layers.linear import Linear, fuse_linears, gemv_kernel, linear
from tests.kernel_modules import built_kernel


@pytest.fixture(scope="module")
def kernel():
    return built_kernel(gemv_kernel, "the bf16 decode kernel")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16, 33, 64])
@pytest.mark.parametrize("in_features, out_features", [(576, 1536), (100, 70), (64, 5), (2048, 33), (1537, 577)])
def test_gemv_bf16_matches_float_reference(kernel, rows, in_features, out_features):
    torch.manual_seed(rows)
    x = torch.randn(rows, in_features).bfloat16()
    w = torch.randn(out_features, in_features).bfloat16()
    b = torch.randn(out_features).bfloat16()
    reference = x.float() @ w.float().T + b.float()
    out = kernel.gemv_bf16(x, w, b).float()
    # float32 accumulation, one bf16 rounding at the end: within half a bf16 ulp of the largest value
    assert (out - reference).abs().max() <= 2 ** -8 * reference.abs().max()
    assert not torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("in_features, with_bias", [(200, False), (577, True), (1536, True), (2051, False)])
def test_gemv_bf16_gives_each_row_the_same_numbers_in_any_batch(kernel, in_features, with_bias):
    """A sequence decoded alone or beside up to 63 others gets bit-identical projections (a few short rows take
    the weights one row at a time, more rows four at a time: the same numbers)."""
    torch.manual_seed(0)
    x = torch.randn(64, in_features).bfloat16()
    w = torch.randn(301, in_features).bfloat16()
    b = torch.randn(301).bfloat16() if with_bias else None
    alone = torch.cat([kernel.gemv_bf16(x[i : i + 1], w, b) for i in range(64)])
    for rows in (2, 3, 4, 5, 16, 64):
        assert torch.equal(kernel.gemv_bf16(x[:rows], w, b), alone[:rows]), rows
    with pytest.raises(RuntimeError, match="1 <= M <= 64"):
        kernel.gemv_bf16(torch.randn(65, in_features).bfloat16(), w, None)


@pytest.mark.parametrize("rows", [1, 3, 5, 17])
def test_gemv_bf16_heads_matches_bmm(kernel, rows):
    """MLA's absorbed decode: each head's query slice times that head's weights, from a strided view."""
    torch.manual_seed(rows)
    q = torch.randn(rows, 4, 40).bfloat16()[:, :, :24]  # [N, heads, 24], not contiguous
    w = torch.randn(4, 70, 24).bfloat16()  # [heads, out, K]
    reference = torch.einsum("nhk,hok->nho", q.float(), w.float())
    out = kernel.gemv_bf16_heads(q, w).float()
    assert out.shape == (rows, 4, 70)
    assert (out - reference).abs().max() <= 2 ** -8 * reference.abs().max()


def test_linear_dispatch_agrees_with_torch_for_all_shapes(kernel):
    torch.manual_seed(0)
    w = torch.randn(48, 96).bfloat16()
    for rows in (1, 4, 5, 32, 33, 64, 200):  # kernel for <= 32 rows, torch beyond
        x = torch.randn(rows, 96).bfloat16()
        torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w), rtol=2e-2, atol=2e-2)


def test_fused_linear_equals_separate_ones():
    torch.manual_seed(0)
    layers = [Linear(16, n, bias=b) for n, b in ((8, True), (4, False), (4, True))]
    fused = fuse_linears(layers)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in layers], dim=-1))


def test_bfloat16_fast_path_tracks_transformers_bfloat16(tmp_path):
    """bf16 rounds differently in every implementation, so greedy paths may part at near-ties: compare
    teacher-forced along our own greedy continuation instead of free-running."""
    from ownllm import LLM, SamplingParams
    from tests.checkpoints import build_checkpoint, random_prompts

    reference = build_checkpoint(tmp_path, "LlamaForCausalLM", hidden_size=128, intermediate_size=256).to(torch.bfloat16)
    llm = LLM(str(tmp_path), dtype="bfloat16")
    agree = total = 0
    diffs = []
    for prompt in random_prompts():
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=32, min_tokens=32, logprobs=1))[0].outputs[0]
        with torch.inference_mode():
            ref = reference(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        for step, token in enumerate(out.token_ids):
            total += 1
            agree += int(ref[step].argmax()) == token
            assert float(ref[step].max() - ref[step, token]) < 0.1, "our choice is no near-tie for transformers"
            diffs.append(abs(out.logprobs[step][token].logprob - float(ref[step, token])))
    assert agree >= 0.9 * total
    assert max(diffs) < 0.1 and sum(diffs) / len(diffs) < 0.02


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int4_weights_from_gguf_blocks(qtype):
    import gguf
    import numpy as np

    from ownllm.layers.quant import Int4Weight, int4_linear

    rng = np.random.default_rng(0)
    dense = rng.standard_normal((64, 96)).astype(np.float32)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    blocks = gguf.quants.quantize(dense, kind)  # [64, 3 * block_bytes]
    expected = torch.from_numpy(gguf.quants.dequantize(blocks, kind)).reshape(64, 96)
    weight = Int4Weight.from_gguf_blocks(blocks, (64, 96), has_min=qtype == "Q4_1")
    torch.testing.assert_close(weight.dequantize(torch.float32), expected, rtol=0, atol=1e-6)
    x = torch.randn(3, 96).bfloat16()
    packed, scales_and_zeros = weight.pack(torch.bfloat16)
    out = int4_linear(x, packed, scales_and_zeros).float()
    reference = x.float() @ expected.T
    assert (out - reference).abs().max() <= 2e-2 * reference.abs().max()


def test_int4_fusion_equals_separate():
    from ownllm.layers.quant import Int4Weight

    torch.manual_seed(0)
    parts = [Int4Weight.from_codes(torch.randint(0, 16, (n, 64), dtype=torch.uint8), torch.rand(n, 2),
                                   torch.randn(n, 2))
             for n in (64, 32, 32)]
    layers = []
    for part in parts:
        layer = Linear(64, part.shape[0], bias=False)
        layer.set_quantized(part)
        layers.append(layer)
    fused = fuse_linears(layers)
    for layer in [fused, *layers]:
        layer.finalize(torch.bfloat16)
    x = torch.randn(2, 64).bfloat16()
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in layers], dim=-1))


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 16, 40])
@pytest.mark.parametrize("out_features, in_features", [(96, 576), (33, 96), (64, 1536)])
def test_packed_int4_matches_dequantized_weights(rows, out_features, in_features, monkeypatch):
    """Our bf16 4-bit kernel (what CPUs without AVX-512 VNNI run; the integer one is tests/test_int4_vnni.py) against
    the float32 product with the dequantized weights (odd group counts, as 96 = 3 groups, take the kernel's tail),
    and each row's result independent of the other rows."""
    import ownllm.layers.quant as quant
    from ownllm.layers.quant import Int4Weight, PackedInt4

    monkeypatch.setattr(quant, "vnni_kernels", lambda name="kquant_vnni": None)
    torch.manual_seed(rows + out_features)
    groups = in_features // 32
    weight = Int4Weight.from_codes(torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8),
                                   torch.rand(out_features, groups) / 8, torch.randn(out_features, groups) / 4)
    packed = PackedInt4(weight, torch.bfloat16)
    if not cpu_has_bf16():
        pytest.skip("the 4-bit kernel cannot run on this CPU")
    assert packed.kernel is not None, "the kernel failed to build (see the log)"
    dense = weight.dequantize(torch.float32)
    x = torch.randn(rows, in_features).bfloat16()
    bias = torch.randn(out_features).bfloat16()
    reference = x.float() @ dense.T + bias.float()
    out = packed.matmul(x, bias)
    # exact codes times bf16 activations, float32 sums, one rounding at the end
    assert (out.float() - reference).abs().max() <= 2**-8 * reference.abs().max()
    assert torch.equal(packed.matmul(x[-1:], bias), out[-1:])  # batch-invariant: alone = in the batch


@pytest.mark.parametrize("out_features", [33, 48])
def test_int4_weights_without_our_kernels(out_features, monkeypatch):
    """CPUs without AVX-512 (BF16 or VNNI) multiply 4-bit weights with torch's int4 kernel, which takes only row
    counts that are multiples of 16; other counts take the dequantized weights instead of failing to load."""
    import ownllm.layers.quant as quant
    from ownllm.layers.quant import Int4Weight, PackedInt4

    monkeypatch.setattr(quant, "vnni_kernels", lambda name="kquant_vnni": None)
    monkeypatch.setattr(quant, "bf16_kernels", lambda name: None)
    torch.manual_seed(out_features)
    weight = Int4Weight.from_codes(torch.randint(0, 16, (out_features, 96), dtype=torch.uint8),
                                   torch.rand(out_features, 3) / 8, torch.randn(out_features, 3) / 4)
    packed = PackedInt4(weight, torch.bfloat16)
    assert (packed.dense is not None) == (out_features % 16 != 0)
    x, bias = torch.randn(5, 96).bfloat16(), torch.randn(out_features).bfloat16()
    reference = x.float() @ weight.dequantize(torch.float32).T + bias.float()
    assert (packed.matmul(x, bias).float() - reference).abs().max() <= 2**-6 * reference.abs().max()


BLOCK_TYPES = ["Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0):
    """Random GGUF blocks of `qtype` -> (raw blocks [rows, cols / W * B], gguf-py's dequantization of them,
    float32 [rows, cols])."""
    import gguf
    import numpy as np

    from tests.gguf_writer import random_quant_blocks

    kind = gguf.GGMLQuantizationType[qtype]
    blocks = random_quant_blocks(kind, rows, cols, np.random.default_rng(seed))
    return blocks, torch.from_numpy(gguf.quants.dequantize(blocks, kind)).reshape(rows, cols)


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_block_weights_dequantize_as_gguf_py(qtype):
    """float32: gguf-py's numbers, all rows or some (an embedding's lookup; Q8_0 by torch, not gguf-py)."""
    import gguf

    from ownllm.layers.quant import BlockWeight

    blocks, expected = random_blocks(qtype, 48, 512)
    weight = BlockWeight.from_gguf_blocks(blocks, (48, 512), gguf.GGMLQuantizationType[qtype])
    assert weight.shape == (48, 512)
    assert torch.equal(weight.dequantize(torch.float32), expected)
    rows = torch.tensor([5, 0, 47, 5])
    assert torch.equal(weight.dequantize(torch.float32, rows=rows), expected[rows])


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_block_weights_dequantize_in_bfloat16_by_the_kernel(qtype):
    import gguf

    from ownllm.layers.quant import BlockWeight

    if not cpu_has_bf16():
        pytest.skip("the block kernels cannot run on this CPU")
    blocks, expected = random_blocks(qtype, 48, 512)
    weight = BlockWeight.from_gguf_blocks(blocks, (48, 512), gguf.GGMLQuantizationType[qtype])
    assert torch.equal(weight.dequantize(torch.bfloat16), expected.bfloat16())  # the kernel's, rounded alike
    rows = torch.tensor([5, 0, 47, 5])
    assert torch.equal(weight.dequantize(torch.bfloat16, rows=rows), expected.bfloat16()[rows])


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9, 16, 32, 40])
@pytest.mark.parametrize("out_features, in_features", [(96, 768), (33, 256), (70, 2048), (20, 8192)])
def test_block_matmul_against_references(qtype, rows, out_features, in_features, monkeypatch):
    """The 32-weight formats (up to 32 rows) and the K-quants otherwise decode to the bf16 weights dequantizing gives and
    multiply as gemv_bf16 does: bit-equal to it, so batch-invariant as it is. The K-quants for one row, or up
    to 4 whose activations fit in 16 KB, multiply by the exact weights in factored form: within the output's
    bf16 rounding of float64 on gguf-py's float32 weights, closer than the bf16 weights get, and the same
    numbers alone as in the batch. Larger batches go to oneDNN a chunk of weight rows at a time, close to
    oneDNN on the whole matrix. (The integer kernel, which takes some formats' decode batches on CPUs with VNNI, is
    turned off here: tests/test_kquant_kernels.py checks it.)"""
    import gguf

    import ownllm.layers.quant as quant
    from ownllm.layers.quant import BlockWeight

    monkeypatch.setattr(quant, "VNNI_MAX_ROWS", {})
    if not cpu_has_bf16():
        pytest.skip("the block kernels cannot run on this CPU")
    assert BlockWeight.runs_here(torch.bfloat16), "the kernel failed to build (see the log)"
    blocks, exact = random_blocks(qtype, out_features, in_features, seed=rows)
    weight = BlockWeight.from_gguf_blocks(blocks, (out_features, in_features), gguf.GGMLQuantizationType[qtype])
    dense = weight.dequantize(torch.bfloat16)
    torch.manual_seed(rows)
    x = torch.randn(rows, in_features).bfloat16()
    bias = torch.randn(out_features).bfloat16()
    out = weight.matmul(x, bias)
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
    if rows > 32:
        torch.testing.assert_close(out, torch.nn.functional.linear(x, dense, bias), rtol=2**-7, atol=1e-2)
    elif qtype in ("Q5_0", "Q5_1", "Q8_0") or not (rows == 1 or (rows <= 4 and rows * in_features * 2 <= 16384)):  # the kernel's rule
        assert torch.equal(out, linear(x, dense, bias))
    else:
        assert torch.equal(out, torch.cat([weight.matmul(x[i : i + 1], bias) for i in range(rows)]))
        reference = x.double() @ exact.double().T + bias.double()  # [rows, out]
        scale = reference.abs().max().item()
        assert ((out.double() - reference).abs() <= reference.abs() * 2**-8 + scale * 1e-5).all()
        bf16_error = (linear(x, dense, bias).double() - reference).abs().mean()
        assert (out.double() - reference).abs().mean() < bf16_error


def test_block_matmul_several_prefill_chunks(monkeypatch):
    import gguf

    import ownllm.layers.quant as quant

    if not cpu_has_bf16():
        pytest.skip("the block kernels cannot run on this CPU")
    monkeypatch.setattr(quant, "PREFILL_CHUNK_ROWS", 32)
    blocks, _ = random_blocks("Q4_K", 100, 256)
    weight = quant.BlockWeight.from_gguf_blocks(blocks, (100, 256), gguf.GGMLQuantizationType.Q4_K)
    x = torch.randn(50, 256).bfloat16()
    expected = torch.nn.functional.linear(x, weight.dequantize(torch.bfloat16))
    torch.testing.assert_close(weight.matmul(x, None), expected, rtol=2**-7, atol=1e-2)
