"""The integer block kernel (kernels/kquant_vnni.cpp): bf16 rows quantized to 8 bits (Q8_K per 256 values for the
K-quants, per 32 for Q8_0 / Q5_0) times GGUF blocks with integer dot products, against two references: the same
activation quantization done here in numpy, then float64 (equal within the output's float rounding), and
float64 on the unquantized activations (within the error the activations' rounding implies)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ownllm.kernels.build import cpu_has_vnni, vnni_kernels
from tests.kernel_modules import built_kernel

FORMATS = {"Q4_K": 256, "Q6_K": 256, "Q8_0": 32, "Q5_0": 32}  # -> activation block


@pytest.fixture(scope="module")
def kernel():
    if not cpu_has_vnni():
        pytest.skip("kquant_vnni needs AVX-512 VNNI")
    return built_kernel(vnni_kernels, "kquant_vnni")


def random_weight(qtype: str, rows: int, cols: int, seed: int):
    """-> (BlockWeight of random blocks, gguf-py's float32 weights [rows, cols] as float64)."""
    import gguf

    from ownllm.layers.quant import BlockWeight
    from tests.gguf_writer import random_quant_blocks

    kind = gguf.GGMLQuantizationType[qtype]
    blocks = random_quant_blocks(kind, rows, cols, np.random.default_rng(seed))
    exact = torch.from_numpy(gguf.quants.dequantize(blocks, kind)).reshape(rows, cols).double()
    return BlockWeight.from_gguf_blocks(blocks, (rows, cols), kind), exact


def quantize_reference(x: torch.Tensor, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] bf16 -> (codes [M, K] int8, scales [M, K / block] float32), in float32 as the kernel rounds:
    d = absmax / 127, q = round-half-even(x * (127 / absmax)), all zero where absmax is 0."""
    values = x.float().numpy().reshape(x.shape[0], -1, block)
    absmax = np.abs(values).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inverse = np.where(absmax > 0, np.float32(127) / absmax, np.float32(0)).astype(np.float32)
    codes = np.rint((values * inverse).astype(np.float32)).astype(np.int8)
    return codes.reshape(x.shape), (absmax / np.float32(127)).astype(np.float32)[..., 0]


def activations(rows: int, cols: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(rows, cols) * torch.rand(rows, cols // 32, 1).repeat_interleave(32, -1).view(rows, cols) * 4
    x[0, :32] = 0  # an all-zero block (scale 0)
    return x.to(dtype)


@pytest.mark.parametrize("block", [32, 256])
def test_activations_quantize_as_the_reference(kernel, block):
    x = activations(5, 1024, seed=block)
    codes, scales = kernel.quantize_activations(x, block)
    expected_codes, expected_scales = quantize_reference(x, block)
    assert np.array_equal(codes.numpy(), expected_codes)
    assert np.array_equal(scales.numpy(), expected_scales)


@pytest.mark.parametrize("qtype", list(FORMATS))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16, 32])
@pytest.mark.parametrize("out_features, in_features", [(33, 256), (70, 2048), (19, 768)])
def test_kquant_matmul_against_references(kernel, qtype, rows, out_features, in_features):
    weight, exact = random_weight(qtype, out_features, in_features, seed=rows)
    check_against_references(lambda x, bias: kernel.kquant_matmul(x, weight.blocks, weight.qtype, bias),
                             FORMATS[qtype], exact, rows, seed=rows)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 31, 32])
@pytest.mark.parametrize("out_features, in_features", [(40, 256), (72, 2048), (16, 768)])
def test_interleaved_rows_against_references(kernel, qtype, rows, out_features, in_features):
    """Q4_K and Q6_K repacked 8 rows interleaved (Q4_Kx8, Q6_Kx8): the same bounds, and the file layout's numbers up
    to float32 summation order (the integer sums are the same)."""
    from ownllm.layers.quant import INTERLEAVED_BYTES

    weight, exact = random_weight(qtype, out_features, in_features, seed=rows)
    packed = kernel.x8_repack(weight.blocks, weight.qtype)
    assert packed.shape == (out_features // 8, in_features // 256 * INTERLEAVED_BYTES[weight.qtype])
    out = check_against_references(lambda x, bias: kernel.x8_matmul(x, packed, weight.qtype, bias), FORMATS[qtype],
                                   exact, rows, seed=rows)
    x = activations(rows, in_features, seed=rows)
    torch.manual_seed(rows)  # the bias check_against_references drew
    bias = torch.randn(out_features).bfloat16()
    file_layout = kernel.kquant_matmul(x, weight.blocks, weight.qtype, bias).double()
    assert ((out - file_layout).abs() <= file_layout.abs() * 2**-7 + file_layout.abs().max() * 1e-5).all()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 33, 64, 129, 600])
@pytest.mark.parametrize("out_features, in_features", [(40, 256), (72, 2048), (16, 768)])
def test_interleaved_tiles_against_references(kernel, qtype, rows, out_features, in_features):
    """The tiled kernel (x8_gemm: up to 8 activation rows x 8 interleaved weight rows, any number of rows, also
    prefill's): the same bounds as the rows kernel, a row's numbers the same alone as in any batch (the last
    tile partial at odd row counts), and at up to 32 rows the rows kernel's: Q6_K's exactly (a decode batch may
    take either), Q4_K's within float32 summation order."""
    weight, exact = random_weight(qtype, out_features, in_features, seed=rows)
    packed = kernel.x8_repack(weight.blocks, weight.qtype)
    out = check_against_references(lambda x, bias: kernel.x8_gemm(x, packed, weight.qtype, bias), FORMATS[qtype],
                                   exact, rows, seed=rows)
    if rows <= 32:
        x = activations(rows, in_features, seed=rows)
        torch.manual_seed(rows)
        bias = torch.randn(out_features).bfloat16()
        rows_kernel = kernel.x8_matmul(x, packed, weight.qtype, bias).double()
        assert ((out - rows_kernel).abs() <= rows_kernel.abs() * 2**-7 + rows_kernel.abs().max() * 1e-5).all()
        if qtype == "Q6_K":
            assert torch.equal(out, rows_kernel)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_interleaved_rows_dequantize_as_gguf(kernel, qtype):
    weight, exact = random_weight(qtype, 24, 1536, seed=5)
    packed = kernel.x8_repack(weight.blocks, weight.qtype)
    out = kernel.x8_dequantize(packed, weight.qtype, torch.empty(24, 1536, dtype=torch.bfloat16))
    assert torch.equal(out, exact.float().bfloat16())


def check_against_references(multiply, block: int, exact: torch.Tensor, rows: int, seed: int,
                             dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """multiply(x [rows, K], bias [N]) -> [rows, N], all of `dtype` (bf16, or float32 for kernels/x16_avx2.cpp),
    activations quantized per `block` values, against the float64 references below; returns the product as
    float64."""
    out_features, in_features = exact.shape
    x = activations(rows, in_features, seed=seed, dtype=dtype)
    torch.manual_seed(seed)
    bias = torch.randn(out_features).to(dtype)
    out = multiply(x, bias)
    assert out.shape == (rows, out_features) and out.dtype == dtype
    out = out.double()
    output_rounding = 2**-8 if dtype == torch.bfloat16 else 2**-20

    # 1. the activations quantized as the kernel does, then float64: equal within float32 sums and output rounding
    codes, scales = quantize_reference(x, block)
    dequantized = torch.from_numpy(codes.astype(np.float64) * np.repeat(scales.astype(np.float64), block, axis=1))
    reference = dequantized @ exact.T + bias.double()
    scale = reference.abs().max().item()
    assert ((out - reference).abs() <= reference.abs() * output_rounding + scale * 1e-5).all()

    # 2. the unquantized activations: each x is off by at most d / 2 = absmax / 254 of its block, so each output
    # by at most sum over blocks of (sum of |w| in the block) * absmax / 254, plus the rounding above
    exact_out = x.double() @ exact.T + bias.double()
    absmax = x.double().abs().view(rows, -1, block).amax(-1)  # [rows, blocks]
    weight_mass = exact.abs().view(out_features, -1, block).sum(-1)  # [out, blocks]
    bound = absmax @ weight_mass.T / 254 + exact_out.abs() * output_rounding + scale * 1e-5
    assert ((out - exact_out).abs() <= bound).all()

    # 3. every row the same numbers alone as in the batch (and, for large batches, as in a batch of its own tile's
    # size at other offsets: a few rows)
    picked = range(rows) if rows <= 40 else sorted({0, 1, 7, 8, rows // 2, rows - 2, rows - 1})
    alone = torch.cat([multiply(x[i : i + 1], bias) for i in picked])
    assert torch.equal(out[list(picked)], alone.double())
    return out


def test_block_weight_uses_the_integer_kernel_up_to_its_crossover(kernel):
    import gguf

    from ownllm.layers.quant import VNNI_MAX_ROWS

    assert set(VNNI_MAX_ROWS) == {gguf.GGMLQuantizationType[name] for name in FORMATS}
    for name in FORMATS:
        qtype = gguf.GGMLQuantizationType[name]
        max_rows = VNNI_MAX_ROWS[qtype]
        weight, _ = random_weight(name, 40, 512, seed=qtype)
        for rows in (1, max_rows, max_rows + 1):
            x = activations(rows, 512, seed=rows)
            integer = rows <= max_rows
            expected = kernel.kquant_matmul(x, weight.blocks, qtype, None) if integer else None
            out = weight.matmul(x, None)
            if integer:
                assert torch.equal(out, expected)
            else:  # the float path (block_matmul or oneDNN), close to the integer one
                torch.testing.assert_close(out, weight.dequantize(torch.bfloat16).float().matmul(x.float().T).T.bfloat16(),
                                           rtol=2**-6, atol=5e-2)


def test_block_weight_falls_back_without_the_integer_kernel(monkeypatch):
    """Without kquant_vnni (a CPU without VNNI, or a build that failed) the float kernel answers, as before; so it
    does for a shape the integer kernel does not take (K not a multiple of 64)."""
    import ownllm.layers.quant as quant
    from ownllm.kernels.build import bf16_kernels, cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("the block kernels cannot run on this CPU")
    weight, _ = random_weight("Q8_0", 24, 512, seed=1)
    x = activations(3, 512, seed=3)
    float_kernel = bf16_kernels("block_matmul")
    monkeypatch.setattr(quant, "vnni_kernels", lambda: None)
    assert torch.equal(weight.matmul(x, None), float_kernel.block_matmul(x, weight.blocks, weight.qtype, None))
    monkeypatch.undo()
    narrow, _ = random_weight("Q8_0", 24, 96, seed=2)
    x = activations(2, 96, seed=2)
    assert torch.equal(narrow.matmul(x, None), float_kernel.block_matmul(x, narrow.blocks, narrow.qtype, None))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quant_weights_are_repacked_at_load(kernel, qtype, monkeypatch):
    """BlockWeight.packed (what Linear.finalize keeps) repacks Q4_K and Q6_K with rows a multiple of 8 into
    InterleavedBlocks, which multiplies any rows by the tiles (Q6_K's up to 4 rows by the rows kernel, the same
    numbers) and, with the integer kernels not asked for, with its rows dequantized to bf16 for oneDNN;
    other row counts, formats other than Q8_0 and weights asked to stay as loaded keep the file's blocks."""
    import ownllm.layers.quant as quant
    from ownllm.layers.quant import X8_ROWS_KERNEL_MAX_ROWS, BlockWeight, InterleavedBlocks

    weight, exact = random_weight(qtype, 1032, 512, seed=9)  # 1032 rows: two prefill chunks (1024 + 8)
    packed = weight.packed(torch.bfloat16)
    assert isinstance(packed, InterleavedBlocks) and isinstance(packed, BlockWeight) and packed.qtype == weight.qtype
    assert packed.shape == weight.shape and packed.packed(torch.bfloat16) is packed
    assert torch.equal(packed.dequantize(torch.bfloat16), weight.dequantize(torch.bfloat16))
    rows_kernel_max = X8_ROWS_KERNEL_MAX_ROWS.get(weight.qtype, 0)
    for rows in (1, 4, 5, 8, 32):
        x = activations(rows, 512, seed=rows)
        multiply = kernel.x8_matmul if rows <= rows_kernel_max else kernel.x8_gemm
        assert torch.equal(packed.matmul(x, None), multiply(x, packed.blocks, weight.qtype, None))
    x = activations(33, 512, seed=33)  # a prompt: the tiles too (the float path, bf16 activations, when asked)
    bias = torch.randn(1032).bfloat16()
    expected = torch.nn.functional.linear(x, exact.float().bfloat16(), bias)
    torch.testing.assert_close(packed.float_matmul(x, bias), expected, rtol=2**-7, atol=1e-2)
    assert torch.equal(packed.matmul(x, bias), kernel.x8_gemm(x, packed.blocks, weight.qtype, bias))
    x = activations(70, 512, seed=70)  # a decode batch of 70 rows: the tiles
    with quant.decode_step(True):
        decoded = packed.matmul(x, bias)
    assert torch.equal(decoded, kernel.x8_gemm(x, packed.blocks, weight.qtype, bias))
    for rows in (1, 3, 5):  # a row's numbers: the same in a batch of any size, whichever kernel takes it
        assert torch.equal(decoded[40 : 40 + rows], packed.matmul(x[40 : 40 + rows], bias))
    assert torch.equal(packed.matmul(x, bias), decoded)  # outside a decode step (a prompt): the same numbers
    monkeypatch.setattr(quant, "VNNI_MAX_ROWS", {})  # the integer kernels not asked for: the float path throughout
    x = activations(4, 512, seed=4)
    assert torch.equal(packed.matmul(x, bias), packed.float_matmul(x, bias))
    assert weight.packed(torch.bfloat16, repack=False) is weight
    assert weight.packed(torch.float32) is weight
    odd, _ = random_weight(qtype, 20, 512, seed=1)
    q5, _ = random_weight("Q5_0", 16, 512, seed=1)  # (Q8_0 is repacked too: tests/test_x16_vnni.py)
    assert odd.packed(torch.bfloat16) is odd and q5.packed(torch.bfloat16) is q5
    monkeypatch.undo()
    x = activations(40, 512, seed=40)  # the file's blocks in a decode batch: the integer kernel by 32 rows
    with quant.decode_step(True):
        assert torch.equal(q5.matmul(x, None), torch.cat([kernel.kquant_matmul(c, q5.blocks, q5.qtype, None)
                                                           for c in x.split(32)]))
