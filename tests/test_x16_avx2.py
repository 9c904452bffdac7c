"""The AVX2 integer kernel (kernels/x16_avx2.cpp) and its layouts (layers/quant_avx2.py): every GGUF block format
decoded to codes, scales and offsets that give gguf-py's weights, then float32 rows quantized to 8 bits per block
times the repacked weights, against the float64 references of tests/test_kquant_kernels.py (the activations
quantized the same way in numpy: equal within float32 sums; the unquantized activations: within the error 8-bit
activations imply). Each row's numbers are the same alone as in a batch. Runs on every CPU with AVX2 and FMA
(the AVX-512 ones too)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ownllm.kernels.build import avx2_kernels, cpu_has_avx2
from tests.test_kquant_kernels import check_against_references, random_weight

FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def kernel():
    if not cpu_has_avx2():
        pytest.skip("x16_avx2 needs AVX2 and FMA")
    module = avx2_kernels()
    assert module is not None, "x16_avx2 failed to build (see the log)"
    return module


@pytest.mark.parametrize("name", [name for name in FORMATS if name != "Q4_K"])  # Q4_K: packed from its blocks
def test_decoded_codes_give_gguf_weights(name):
    from ownllm.layers.quant_avx2 import decode_blocks

    weight, exact = random_weight(name, 5, 512, seed=len(name))
    codes, scale, offset, block = decode_blocks(weight.blocks.numpy(), int(gguf.GGMLQuantizationType[name]))
    assert codes.shape == (5, 512) and scale.shape == offset.shape == (5, 512 // block)
    assert codes.max() < (16 if name in ("Q4_0", "Q4_1") else 256 if name == "Q8_0" else 64)
    values = codes * np.repeat(scale.astype(np.float64), block, 1) + np.repeat(offset.astype(np.float64), block, 1)
    assert np.allclose(values, exact.numpy(), rtol=1e-6, atol=1e-9)


def packed_weight(name: str, out_features: int, in_features: int, seed: int):
    """-> (the X16Weight of a random weight of format `name`, its exact weights as float64)."""
    from ownllm.layers.quant import Int4Weight
    from ownllm.layers.quant_avx2 import X16Weight

    weight, exact = random_weight(name, out_features, in_features, seed=seed)
    if name in ("Q4_0", "Q4_1"):  # the loader's Int4Weight, packed as models pack it
        weight = Int4Weight.from_gguf_blocks(weight.blocks.numpy(), (out_features, in_features), name == "Q4_1")
        packed = weight.packed(torch.float32)
    else:
        packed = X16Weight.from_file(weight.blocks, int(weight.qtype))
    assert isinstance(packed, X16Weight) and packed.shape == (out_features, in_features)
    return packed, exact


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17, 33])
@pytest.mark.parametrize("name", FORMATS)
def test_formats_against_references(kernel, name, rows):
    out_features, in_features = (40, 512) if rows % 2 else (19, 768)  # N a multiple of 16 or not
    packed, exact = packed_weight(name, out_features, in_features, seed=rows)
    check_against_references(packed.matmul, packed.activation_block, exact, rows, seed=rows, dtype=torch.float32)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_prompt_sized_batches_keep_each_rows_numbers(kernel, name):
    """A prompt of 70 rows: the same bounds, and its rows' numbers as when each is multiplied alone."""
    packed, exact = packed_weight(name, 33, 256, seed=70)
    check_against_references(packed.matmul, packed.activation_block, exact, 70, seed=70, dtype=torch.float32)


def test_bad_input_is_refused_by_name(kernel):
    packed, _ = packed_weight("Q4_K", 16, 256, seed=1)
    with pytest.raises(RuntimeError, match="float32"):
        packed.matmul(torch.zeros(1, 256, dtype=torch.bfloat16), None)
    with pytest.raises(RuntimeError, match="K = 256"):
        packed.matmul(torch.zeros(1, 255), None)
    with pytest.raises(RuntimeError, match="layout 1 with blocks of 8"):
        kernel.x16_matmul_avx2(torch.zeros(1, 256), packed.blocks, 16, 1, 8, None)
