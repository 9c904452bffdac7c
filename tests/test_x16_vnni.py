"""The 16-row integer kernel (kernels/x16_vnni.cpp): bf16 rows quantized to 8 bits per 32 values times Q4_0 / Q4_1
(layers/quant.py interleave_int4) or Q8_0 (X16Blocks) weights repacked 16 rows interleaved, against the float64 references of
tests/test_kquant_kernels.py: the activations quantized the same way in numpy (equal within float32 sums and the
bf16 output), and the unquantized activations times the dequantized weights (within the error 8-bit activations
imply: each value moves by at most half a step, absmax / 254 of its block, so each output by at most
sum over blocks of absmax / 254 times the block's sum of |w|). Each row's numbers are the same alone as in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ownllm.kernels.build import cpu_has_vnni, vnni_kernels
from tests.kernel_modules import built_kernel
from tests.test_kquant_kernels import activations, check_against_references


@pytest.fixture(scope="module")
def kernel():
    if not cpu_has_vnni():
        pytest.skip("x16_vnni needs AVX-512 VNNI")
    return built_kernel(lambda: vnni_kernels("x16_vnni"), "x16_vnni")


def random_int4(rows: int, cols: int, seed: int):
    """-> (Int4Weight of random codes, scales and zeros, its weights [rows, cols] as float64)."""
    from ownllm.layers.quant import Int4Weight

    torch.manual_seed(seed)
    groups = cols // 32
    weight = Int4Weight.from_codes(torch.randint(0, 16, (rows, cols), dtype=torch.uint8),
                                   torch.rand(rows, groups) / 8, torch.randn(rows, groups) / 4)
    return weight, weight.dequantize(torch.float32).double()


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17, 31, 32, 33, 64])
@pytest.mark.parametrize("out_features, in_features", [(96, 576), (33, 96), (19, 1536), (1, 32), (40, 2048)])
def test_int4_weights_against_references(kernel, rows, out_features, in_features):
    from ownllm.layers.quant import interleave_int4

    weight, exact = random_int4(out_features, in_features, seed=rows + out_features)
    packed = interleave_int4(weight)
    assert packed.shape == (-(-out_features // 16), in_features // 32 * 384)
    check_against_references(lambda x, bias: kernel.x16_matmul(x, packed, out_features, 2, bias), 32, exact, rows,
                             seed=rows)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 17, 32])
@pytest.mark.parametrize("out_features, in_features", [(33, 96), (19, 1536), (40, 2048)])
def test_q8_0_weights_against_references(kernel, rows, out_features, in_features):
    """Q8_0 blocks repacked (X16Blocks): the same bounds; the dequantized layout equals gguf-py's weights."""
    from ownllm.layers.quant import X16Blocks
    from tests.test_kquant_kernels import random_weight

    weight, exact = random_weight("Q8_0", out_features, in_features, seed=rows)
    packed = weight.packed(torch.bfloat16)
    assert isinstance(packed, X16Blocks) and packed.shape == weight.shape and packed.packed(torch.bfloat16) is packed
    assert torch.equal(packed.dequantize(torch.float64), exact)
    out = check_against_references(packed.matmul, 32, exact, rows, seed=rows)
    if in_features % 64 == 0:  # the file layout's integer kernel: the same integer sums, float32 order aside
        x = activations(rows, in_features, seed=rows)
        torch.manual_seed(rows)  # the bias check_against_references drew
        file_layout = weight.matmul(x, torch.randn(out_features).bfloat16()).double()
        assert ((out - file_layout).abs() <= file_layout.abs() * 2**-7 + file_layout.abs().max() * 1e-5).all()


def test_q8_0_prompts_dequantize_for_onednn_and_decode_batches_stay_integer(kernel):
    """A prompt beyond VNNI_MAX_ROWS rows goes to the weight as loaded (1040 rows: two chunks dequantized to bf16
    for oneDNN): the file layout's numbers. A decode batch of as many rows takes the integer kernel, each row as
    alone."""
    from ownllm.layers.quant import decode_step
    from tests.test_kquant_kernels import random_weight

    weight, _ = random_weight("Q8_0", 1040, 256, seed=3)
    packed = weight.packed(torch.bfloat16)
    x = activations(40, 256, seed=40)
    bias = torch.randn(1040).bfloat16()
    assert torch.equal(packed.matmul(x, bias), weight.matmul(x, bias))
    with decode_step(True):
        decoded = packed.matmul(x, bias)
    assert torch.equal(decoded, kernel.x16_matmul(x, packed.blocks, packed.rows, 8, bias))
    assert torch.equal(decoded[33:34], packed.matmul(x[33:34], bias))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_packed_int4_from_gguf_blocks_uses_the_integer_kernel(kernel, qtype):
    """A file's Q4_0 / Q4_1 blocks (gguf-py's quantizer) through PackedInt4, as a model loads them: the integer
    kernel, within the bounds above of gguf-py's dequantized weights; without a bias too."""
    import gguf

    from ownllm.layers.quant import Int4Weight, PackedInt4

    rng = np.random.default_rng(1)
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    blocks = gguf.quants.quantize(rng.standard_normal((50, 640)).astype(np.float32), kind)
    exact = torch.from_numpy(gguf.quants.dequantize(blocks, kind)).reshape(50, 640).double()
    packed = PackedInt4(Int4Weight.from_gguf_blocks(blocks, (50, 640), has_min=qtype == "Q4_1"), torch.bfloat16)
    assert packed.integer is not None
    check_against_references(packed.matmul, 32, exact, 5, seed=5)
    x = torch.randn(3, 640).bfloat16()
    assert torch.equal(packed.matmul(x, None), kernel.x16_matmul(x, packed.interleaved, 50, 3, None))


def test_x16_matmul_rejects_mismatched_shapes(kernel):
    from ownllm.layers.quant import interleave_int4

    weight, _ = random_int4(20, 64, seed=0)
    packed = interleave_int4(weight)
    with pytest.raises(RuntimeError, match="x: \\[M, K\\] bf16, K = 64"):
        kernel.x16_matmul(torch.zeros(2, 96, dtype=torch.bfloat16), packed, 20, 2, None)
    with pytest.raises(RuntimeError, match="N = 40"):
        kernel.x16_matmul(torch.zeros(2, 64, dtype=torch.bfloat16), packed, 40, 2, None)
    with pytest.raises(RuntimeError, match="GGUF type 6 is not Q4_0, Q4_1 or Q8_0"):
        kernel.x16_matmul(torch.zeros(2, 64, dtype=torch.bfloat16), packed, 20, 6, None)


def test_moe_models_keep_the_bf16_int4_kernel(kernel):
    """Int4Weight.packed with repack=False (Linear.keep_file_layout: every 4-bit Linear of a model with routed
    experts) keeps the bf16 kernel; other models' (repack=True) get the integer one."""
    weight, _ = random_int4(32, 64, seed=1)
    assert weight.packed(torch.bfloat16).integer is not None
    kept = weight.packed(torch.bfloat16, repack=False)
    assert kept.integer is None and kept.kernel is not None
