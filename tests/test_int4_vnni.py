"""The integer 4-bit kernel (kernels/int4_vnni.cpp): bf16 rows quantized to 8 bits per 32 values times Q4_0 / Q4_1
weights repacked 16 rows interleaved (layers/quant.py interleave_int4), against the float64 references of
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
from tests.test_kquant_kernels import check_against_references


@pytest.fixture(scope="module")
def kernel():
    if not cpu_has_vnni():
        pytest.skip("int4_vnni needs AVX-512 VNNI")
    return built_kernel(lambda: vnni_kernels("int4_vnni"), "int4_vnni")


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
def test_int4_x16_matmul_against_references(kernel, rows, out_features, in_features):
    from ownllm.layers.quant import interleave_int4

    weight, exact = random_int4(out_features, in_features, seed=rows + out_features)
    packed = interleave_int4(weight)
    assert packed.shape == (-(-out_features // 16), in_features // 32 * 384)
    check_against_references(lambda x, bias: kernel.int4_x16_matmul(x, packed, out_features, bias), 32, exact, rows,
                             seed=rows)


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
    assert torch.equal(packed.matmul(x, None), kernel.int4_x16_matmul(x, packed.interleaved, 50, None))


def test_int4_x16_matmul_rejects_mismatched_shapes(kernel):
    from ownllm.layers.quant import interleave_int4

    weight, _ = random_int4(20, 64, seed=0)
    packed = interleave_int4(weight)
    with pytest.raises(RuntimeError, match="x: \\[M, K\\] bf16, K = 64"):
        kernel.int4_x16_matmul(torch.zeros(2, 96, dtype=torch.bfloat16), packed, 20, None)
    with pytest.raises(RuntimeError, match="N = 40"):
        kernel.int4_x16_matmul(torch.zeros(2, 64, dtype=torch.bfloat16), packed, 40, None)
