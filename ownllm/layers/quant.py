"""GGUF weights kept quantized, for bfloat16 compute: Q4_0 and Q4_1 repacked; Q5_0, Q5_1, Q8_0 and the
K-quants as stored. (For float32 compute on CPUs with AVX2 but not AVX-512: layers/quant_avx2.py.)

4-bit weights are multiplied, on CPUs with AVX-512 VNNI, by kernels/x16_vnni.cpp (activations quantized to 8
bits per block of 32 as llama.cpp does, integer dot products; weights repacked at load 16 rows interleaved), at
any number of rows; on CPUs with AVX-512 BF16 alone by kernels/int4_matmul.cpp (bf16 activations as they are);
by torch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) elsewhere.

GGUF's Q4_0 and Q4_1 store groups of 32 weights as 4-bit codes q with an fp16 scale d (and, for
Q4_1, a minimum m): Q4_0 is w = d * (q - 8), Q4_1 is w = d * q + m. Both are exactly the kernel's
form w = (q - 8) * scale + zero, with zero = 0 and zero = m + 8 * d respectively, so the file's
codes are used as they are; only scale and zero are rounded to the activations' dtype (bfloat16).

Q8_0 and Q5_0 / Q5_1 (groups of 32 8-bit or 5-bit codes with an fp16 scale, and minimum for Q5_1) and
the K-quants Q4_K, Q5_K and Q6_K (256 weights a block, with 6- or 8-bit sub-block scales) stay the file's
bytes (a view of the mapping where no fusing or reordering copies them), read at 0.56-1.06 bytes per
weight instead of 2. kernels/block_matmul.cpp multiplies them: the 32-weight formats with the same
numbers as the bf16 kernel on the weights dequantized to bf16, the K-quants (at batch 1-4) by their exact
weights in a factored form (faster). On CPUs with AVX-512 VNNI, Q4_K, Q6_K, Q8_0 and Q5_0 at decode batches
go instead to kernels/kquant_vnni.cpp, which quantizes the activations to 8 bits as llama.cpp does and
multiplies with integer dot products (faster again; it rounds the activations, by at most half a step of
absmax / 127 per block of 32 or 256). There, Q4_K and Q6_K Linear weights (not MoE experts, which stay views of
the file) are repacked after loading, 8 rows interleaved (InterleavedBlocks): one vector of activation codes then
serves 8 rows and the blocks' scales need no decoding per row, about 2x faster per block than the file's layout.
The integer kernels take every decode batch (`decode_step`: the model runner says when a forward decodes one token
per sequence), in chunks of 32 rows where a kernel takes no more, so a row's numbers are the same in any batch;
prompts of more than 32 rows keep bf16 activations (dequantized weights, oneDNN). Embeddings stored so are
dequantized row by row as tokens look them up. Without that kernel (CPUs lacking AVX-512 BF16) these tensors are dequantized at load.

Quant methods (an interface and a registry, QUANT_METHODS; the runner picks one by name when it builds the
model) decide what a layer does with a quantized weight at load: "kernels" (the default) keeps it as above
wherever its kernel runs; "dequantized", the plain-torch reference, dequantizes every one to the compute dtype.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ownllm.kernels.build import GEMV_MAX_ROWS, bf16_kernels, vnni_kernels
from ownllm.layers.quant_avx2 import Q4_LAYOUT, DenseWeight, X16Weight, float32_kernel
from ownllm.layers.x16_layout import X16_ROWS, interleave_x16
from ownllm.layers.registry import named

GROUP_SIZE = 32
_Q4_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "V16")])  # GGUF's block_q4_0: fp16 scale, 32 4-bit codes
_Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "V16")])  # block_q4_1: and an fp16 minimum
Q4_X16_TYPE = 2  # the GGUF type (Q4_0) that tells kernels/x16_vnni.cpp a weight is in its 4-bit layout (Q4_1 too)
PREFILL_CHUNK_ROWS = 1024  # block-quantized weight rows dequantized at a time for batches too large for the kernel


class _Step(threading.local):
    decode_only = False  # the running forward decodes one token per sequence (model_runner sets it)


_STEP = _Step()


@contextlib.contextmanager
def decode_step(decode_only: bool) -> Iterator[None]:
    """Inside: matmuls belong to a decode batch (decode_only) or not. Decode batches of any size take the integer
    kernels; a forward with prompt tokens does only up to VNNI_MAX_ROWS rows."""
    previous, _STEP.decode_only = _STEP.decode_only, decode_only
    try:
        yield
    finally:
        _STEP.decode_only = previous


def takes_integer(qtype: int, rows: int) -> bool:
    """Whether a matmul of `rows` activation rows of this format runs the integer kernels (see decode_step)."""
    max_rows = VNNI_MAX_ROWS.get(qtype, 0)
    return max_rows > 0 and (rows <= max_rows or _STEP.decode_only)


def in_row_chunks(multiply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """multiply (a kernel taking up to GEMV_MAX_ROWS rows) over x [T, K] in chunks of that many rows."""
    if x.shape[0] <= GEMV_MAX_ROWS:
        return multiply(x)
    return torch.cat([multiply(chunk) for chunk in x.split(GEMV_MAX_ROWS)])


@dataclass
class Int4Weight:
    """w[n, k] = (q[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32], the 4-bit codes q packed two to a byte as
    GGUF's Q4_0 / Q4_1 blocks hold them and our kernel reads them: in each group of 32, byte j holds q[j] in its
    low nibble and q[j + 16] in its high one. So loading copies the file's code bytes as they are."""

    codes: torch.Tensor  # [N, K // 2] uint8
    scale: torch.Tensor  # [N, K // 32] float32
    zero: torch.Tensor  # [N, K // 32] float32

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.codes.shape[0], self.codes.shape[1] * 2))

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> "Int4Weight":
        """q: [N, K] uint8 codes 0..15, one a byte."""
        rows, cols = q.shape
        groups = q.view(rows, cols // GROUP_SIZE, 2, GROUP_SIZE // 2)  # element j and j + 16 share a byte
        return cls((groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(rows, cols // 2).contiguous(), scale, zero)

    @classmethod
    def from_gguf_blocks(cls, blocks: np.ndarray, shape: tuple[int, int], has_min: bool) -> "Int4Weight":
        """blocks: [N, K // 32 * block_bytes] raw Q4_0 (d, qs[16]) or Q4_1 (d, m, qs[16]) blocks."""
        rows, cols = shape
        # one record per block: copying a field is one strided pass (3x faster than slicing the bytes)
        raw = np.asarray(blocks, dtype=np.uint8).reshape(rows, -1).view(_Q4_1_BLOCK if has_min else _Q4_0_BLOCK)
        d = raw["d"].astype(np.float32)  # [N, K // 32]
        codes = raw["qs"].copy().view(np.uint8).reshape(rows, cols // 2)  # [N, K // 2]
        zero = raw["m"].astype(np.float32) + 8 * d if has_min else np.zeros_like(d)
        return cls(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero))

    def unpacked_codes(self) -> torch.Tensor:
        """-> [N, K] uint8, one code a byte."""
        rows, cols = self.shape
        bytes_ = self.codes.view(rows, cols // GROUP_SIZE, GROUP_SIZE // 2)
        return torch.cat([bytes_ & 0x0F, bytes_ >> 4], dim=-1).reshape(rows, cols)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        scale = self.scale.repeat_interleave(GROUP_SIZE, dim=1)  # [N, K]
        zero = self.zero.repeat_interleave(GROUP_SIZE, dim=1)
        return ((self.unpacked_codes().float() - 8) * scale + zero).to(dtype)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Int4Weight":
        """The same row reordering (e.g. undoing llama.cpp's Q/K permutation) applied to codes and scales."""
        return Int4Weight(fn(self.codes), fn(self.scale), fn(self.zero))

    @staticmethod
    def cat(weights: list["Int4Weight"]) -> "Int4Weight":
        return Int4Weight(*(torch.cat([getattr(w, name) for w in weights]) for name in ("codes", "scale", "zero")))

    @staticmethod
    def runs_here(dtype: torch.dtype) -> bool:
        """Whether 4-bit weights can stay quantized for compute in `dtype` (our kernel or torch's; in float32, the
        AVX2 kernel of layers/quant_avx2.py)."""
        return dtype == torch.bfloat16 or (dtype == torch.float32 and float32_kernel() is not None)

    def packed(self, dtype: torch.dtype, repack: bool = True) -> "PackedInt4 | X16Weight | DenseWeight":
        """Always a copy in a kernel's layout; the integer kernel's only where `repack` allows. Models with routed
        experts pass False for all their 4-bit weights (models/base.py post_load) and keep the bf16 kernel (float32:
        the weights dequantized): routing is where rounding shows, and on the tiny random Mixtral Q4_0 of
        tests/test_moe_parity.py 8-bit activations (in the attention projections alone, too) moved 7 of 96
        teacher-forced steps by more than 0.2 nats, where that test allows 4."""
        if dtype == torch.float32:
            return X16Weight(interleave_int4(self), self.shape[0], Q4_LAYOUT, GROUP_SIZE) if repack else \
                DenseWeight(self.dequantize(dtype))
        return PackedInt4(self, dtype, integer=repack)

    def pack(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (codes in torch's int4 kernel layout, scales_and_zeros [K // 32, N, 2] in the activations' dtype)."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpacked_codes().to(torch.int32), 1)
        scales_and_zeros = torch.stack([self.scale.T, self.zero.T], dim=-1).to(dtype).contiguous()
        return packed, scales_and_zeros


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    # x: [T, K] -> [T, N]
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_and_zeros)


TORCH_INT4_ROWS = 16  # torch's int4 CPU kernel takes weights of a multiple of this many rows


def interleave_int4(weight: Int4Weight) -> torch.Tensor:
    """Q4_0 / Q4_1 codes in x16_vnni's Q4 layout: the file's code bytes (two codes each), offset zero - 8 scale."""
    rows, cols = weight.shape
    codes = weight.codes.view(rows, cols // GROUP_SIZE, 4, 4)
    return interleave_x16(codes, weight.scale, weight.zero.float() - 8 * weight.scale.float())


class PackedInt4:
    """An Int4Weight in the layout its kernel multiplies, built once after loading (and fusing): interleaved for the
    integer kernel where it runs (`integer`), else the file's codes with float32 scales for the bf16 one
    (`kernel`), else torch's int4 layout (`packed`), else, for row counts torch's kernel refuses, the dequantized
    weights (`dense`)."""

    def __init__(self, weight: Int4Weight, dtype: torch.dtype, integer: bool = True) -> None:
        self.integer = vnni_kernels("x16_vnni") if integer and dtype == torch.bfloat16 else None
        if self.integer is not None:
            self.rows = weight.shape[0]
            self.interleaved = interleave_int4(weight)  # [ceil(N / 16), K / 32 * 384]
            return
        self.kernel = bf16_kernels("int4_matmul") if dtype == torch.bfloat16 else None
        if self.kernel is None:  # torch's kernel, or the weights dequantized where it refuses the shape
            self.dense = weight.dequantize(dtype) if weight.shape[0] % TORCH_INT4_ROWS else None
            if self.dense is None:
                self.packed, self.scales_and_zeros = weight.pack(dtype)
            return
        self.codes = weight.codes.contiguous()  # [N, K / 2], already the kernel's layout
        self.scales = weight.scale.float().contiguous()  # [N, K / 32]
        self.mins = (weight.zero - 136 * weight.scale).float().contiguous()  # w = scale * (128 + code) + min

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [T, K] -> [T, N]
        if self.integer is not None:
            return self.integer.x16_matmul(x, self.interleaved, self.rows, Q4_X16_TYPE, bias)
        if self.kernel is None:
            if self.dense is not None:
                return F.linear(x, self.dense, bias)
            out = int4_linear(x, self.packed, self.scales_and_zeros)
            return out if bias is None else out + bias
        return self.kernel.int4_matmul(x, self.codes, self.scales, self.mins, bias)


# GGUF block formats kept as the file's bytes: GGML type number (gguf.GGMLQuantizationType) -> (weights per
# block, bytes per block). Numbers, so that models from HF folders need no gguf import.
BLOCK_FORMATS = {
    6: (32, 22),  # Q5_0: fp16 d, 32 fifth bits, 4-bit q[32]
    7: (32, 24),  # Q5_1: as Q5_0, plus an fp16 minimum
    8: (32, 34),  # Q8_0: fp16 d, int8 q[32]
    12: (256, 144),  # Q4_K: fp16 d, fp16 dmin, 6-bit scales and mins, 4-bit q[256]
    13: (256, 176),  # Q5_K: as Q4_K, plus one more bit per weight
    14: (256, 210),  # Q6_K: 4-bit and 2-bit parts of q[256], int8 scales[16], fp16 d
}

# Formats the integer kernel (kernels/kquant_vnni.cpp: activations quantized to 8 bits, VNNI dot products) takes,
# and up to how many activation rows: every row block_matmul would take (GEMV_MAX_ROWS), so that a token's numbers
# are the same whatever else shares its step (batch-invariant decoding; speculative verification rows equal lone
# decode steps, bit for bit). Measured on an AMD EPYC (Zen 4), 4096x1536 weights (bench/RESULTS.md, "Integer
# K-quant kernels"), the float kernel's bf16 tiles would be faster beyond Q5_0/Q8_0 4, Q6_K 8 and Q4_K 16 rows,
# since they share per-block work between rows; switching kernels there made a row's logits depend on the batch
# size (greedy tokens then parted with and without speculation on the real Qwen2.5-Coder-0.5B).
VNNI_MAX_ROWS = {qtype: GEMV_MAX_ROWS for qtype in (6, 8, 12, 14)}  # Q5_0, Q8_0, Q4_K, Q6_K


@dataclass
class BlockWeight:
    """GGUF block-quantized rows (BLOCK_FORMATS): blocks[n] holds row n's K / W blocks of B bytes, as the file
    stores them; kernels/block_matmul.cpp decodes them (its comments give each layout)."""

    blocks: torch.Tensor  # [N, K // W * B] uint8
    qtype: int  # a key of BLOCK_FORMATS

    @property
    def shape(self) -> torch.Size:
        weights, nbytes = BLOCK_FORMATS[self.qtype]
        return torch.Size((self.blocks.shape[0], self.blocks.shape[1] // nbytes * weights))

    @classmethod
    def from_gguf_blocks(cls, blocks: np.ndarray, shape: tuple[int, int], qtype: int) -> "BlockWeight":
        return cls(torch.from_numpy(np.asarray(blocks, dtype=np.uint8).reshape(shape[0], -1)), qtype)

    @staticmethod
    def runs_here(dtype: torch.dtype) -> bool:
        """Whether block-quantized weights can stay so for compute in `dtype` on this CPU (float32: see Int4Weight)."""
        if dtype == torch.float32:
            return float32_kernel() is not None
        return dtype == torch.bfloat16 and bf16_kernels("block_matmul") is not None

    def dequantize(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """-> [N, K] (or [len(rows), K] for those rows), as gguf-py dequantizes them (by the kernel in bf16)."""
        raw = self.blocks if rows is None else self.blocks.index_select(0, rows)
        if dtype == torch.bfloat16 and self.runs_here(dtype):
            out = torch.empty(raw.shape[0], self.shape[1], dtype=torch.bfloat16)
            return bf16_kernels("block_matmul").block_dequantize(raw, int(self.qtype), out)
        import gguf

        values = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(self.qtype))  # float32
        return torch.from_numpy(values.reshape(raw.shape[0], -1)).to(dtype)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "BlockWeight":
        return BlockWeight(fn(self.blocks), self.qtype)

    @staticmethod
    def cat(weights: list["BlockWeight"]) -> "BlockWeight | None":
        """None when they are of different formats (which cannot be stacked)."""
        if len({w.qtype for w in weights}) > 1:
            return None
        return BlockWeight(torch.cat([w.blocks for w in weights]), weights[0].qtype)

    def packed(self, dtype: torch.dtype, repack: bool = True) -> "BlockWeight":
        """The layout its kernel multiplies: Q4_K and Q6_K rows 8 at a time interleaved (InterleavedBlocks), Q8_0 rows
        16 at a time (X16Blocks), where the integer kernels run and `repack` allows (a copy: not for weights that
        must stay views of the file), else the blocks as they are. In float32, the AVX2 kernel's layout (a copy), or
        the weights dequantized where `repack` does not allow a copy."""
        if dtype == torch.float32:
            return X16Weight.from_file(self.blocks, int(self.qtype)) if repack else DenseWeight(self.dequantize(dtype))
        if repack and dtype == torch.bfloat16 and InterleavedBlocks.takes(self):
            return InterleavedBlocks.repack(self)
        if repack and dtype == torch.bfloat16 and X16Blocks.takes(self):
            return X16Blocks.repack(self)
        return self

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [T, K] bf16 -> [T, N]
        integer = self._integer_kernel(x.shape[0])
        if integer is not None:
            return in_row_chunks(lambda rows: integer.kquant_matmul(rows, self.blocks, int(self.qtype), bias), x)
        kernel = bf16_kernels("block_matmul")
        if x.shape[0] <= GEMV_MAX_ROWS:
            return kernel.block_matmul(x, self.blocks, int(self.qtype), bias)
        # prefill: oneDNN on bf16 weights, dequantized a chunk of rows at a time into one reused buffer
        # (L3-sized, never all at once; a fresh buffer per chunk cost more in page faults than the matmul)
        buffer = _dequantize_buffer(PREFILL_CHUNK_ROWS, self.shape[1])
        out = torch.cat([F.linear(x, kernel.block_dequantize(chunk, int(self.qtype), buffer[: chunk.shape[0]]))
                         for chunk in self.blocks.split(PREFILL_CHUNK_ROWS)], dim=-1)
        return out if bias is None else out + bias

    def _integer_kernel(self, rows: int):
        """kquant_vnni when it runs here and takes this format, these rows and K (a multiple of 64), else None."""
        if not takes_integer(int(self.qtype), rows) or self.shape[1] % 64:
            return None
        return vnni_kernels()


# Which integer kernel multiplies the 8-row layouts (kernels/kquant_vnni.cpp): the tiles (x8_gemm: up to 8 activation
# rows at a time, each block's codes unpacked once per tile) at any number of rows, but for Q6_K up to this many
# rows the rows kernel (x8_matmul), whose lighter unpacking is 1.15-1.6x faster at 1-4 rows on the 1.5B's Q6_K
# matrices (the tiles are 1.04-1.09x faster at 5-6 rows, 1.17-1.25x at 8, 1.3-1.4x at 16; 2 threads). The two give a
# row the same numbers (each block's integer total, then one float multiply-add), so a row's numbers are the same
# in any decode batch. Measured on an AMD EPYC (Zen 4): Q4_K tiles 1.0-1.3x the rows kernel at 1 row, 1.3-1.5x at
# 2-32 (1 thread, CPU time, under load); the tiles beat the float path (x8_dequantize, then oneDNN bf16) at every
# row count above 32: Q4_K 1.4x (512 rows) to 3x (33), Q6_K 1.05x to 2.4x.
X8_ROWS_KERNEL_MAX_ROWS = {14: 4}  # Q6_K

# Block formats repacked at load for the integer kernel's 8-row layouts (kernels/kquant_vnni.cpp, Q4_Kx8 and
# Q6_Kx8): GGML type number -> bytes per group of 8 rows per 256 weights
INTERLEAVED_BYTES = {12: 1216, 14: 1728}  # Q4_K (8 x 144 + 64), Q6_K (8 x 210 + 48)


@dataclass
class InterleavedBlocks(BlockWeight):
    """Q4_K or Q6_K weights repacked at load for kernels/kquant_vnni.cpp's 8-row kernels: `blocks` is
    [N / 8, K / 256 * INTERLEAVED_BYTES[qtype]], each group of 8 rows' blocks interleaved (one 512-bit vector holds
    8 rows' codes), scales as bytes, d (and dmin) as float32 (the layouts are in the kernel's comments; 5.6% (Q4_K)
    and 2.9% (Q6_K) more bytes than the file's). At 1 row they multiply about 2x faster than the file's blocks,
    whose per-block decoding, not memory, bounded the kernel; the integer arithmetic is the same, so the numbers
    are the file layout's up to float32 summation order. Every batch, a prompt's too, takes the tiles (x8_gemm;
    Q6_K's of up to 4 rows the rows kernel, see X8_ROWS_KERNEL_MAX_ROWS), so a row's numbers are the same in any
    batch and at prefill as at decode. Prompts run on 8-bit activations, as llama.cpp's do: the tiles are 1.4-3x
    faster than dequantizing to bf16 for oneDNN (float_matmul, kept for when the integer kernels are not asked
    for), and they move the tiny random checkpoints' logprobs as far from float32 as llama.cpp's own kernels move
    them, plus what bf16 activations add (tests/test_gguf_parity.py, eight_bit_bounds)."""

    ROWS = 8

    @staticmethod
    def takes(weight: BlockWeight) -> bool:
        qtype = int(weight.qtype)
        return (qtype in INTERLEAVED_BYTES and weight.blocks.shape[0] % InterleavedBlocks.ROWS == 0
                and VNNI_MAX_ROWS.get(qtype, 0) > 0 and vnni_kernels() is not None)

    @classmethod
    def repack(cls, weight: BlockWeight) -> "InterleavedBlocks":
        return cls(vnni_kernels().x8_repack(weight.blocks.contiguous(), int(weight.qtype)), weight.qtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.blocks.shape[0] * self.ROWS, self.blocks.shape[1] // INTERLEAVED_BYTES[int(self.qtype)] * 256))

    def dequantize(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        out = vnni_kernels().x8_dequantize(self.blocks, int(self.qtype), torch.empty(*self.shape, dtype=torch.bfloat16))
        return (out if rows is None else out.index_select(0, rows)).to(dtype)

    def map_rows(self, fn):
        raise TypeError("InterleavedBlocks is a kernel layout built after loading: map the file's BlockWeight instead")

    def packed(self, dtype: torch.dtype, repack: bool = True) -> "InterleavedBlocks":
        return self

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [T, K] bf16 -> [T, N]
        kernel, qtype = vnni_kernels(), int(self.qtype)
        if not VNNI_MAX_ROWS.get(qtype, 0):  # the integer kernels not asked for
            return self.float_matmul(x, bias)
        if x.shape[0] <= X8_ROWS_KERNEL_MAX_ROWS.get(qtype, 0):
            return kernel.x8_matmul(x, self.blocks, qtype, bias)
        return kernel.x8_gemm(x, self.blocks, qtype, bias)

    def float_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """oneDNN on bf16 weights, dequantized PREFILL_CHUNK_ROWS rows at a time into one reused buffer."""
        kernel, qtype = vnni_kernels(), int(self.qtype)
        buffer = _dequantize_buffer(PREFILL_CHUNK_ROWS, self.shape[1])
        out = torch.cat([F.linear(x, kernel.x8_dequantize(chunk, qtype, buffer[: chunk.shape[0] * self.ROWS]))
                         for chunk in self.blocks.split(PREFILL_CHUNK_ROWS // self.ROWS)], dim=-1)
        return out if bias is None else out + bias


Q8_0 = 8
X16_Q8_BYTES = 640  # x16_vnni's Q8 layout: bytes per 16 rows x 32 weights (codes 512, scales 64, offsets 64)


@dataclass
class X16Blocks(BlockWeight):
    """Q8_0 weights repacked at load for kernels/x16_vnni.cpp: `blocks` is [ceil(N / 16), K / 32 * 640], 16 rows
    interleaved, codes + 128 as uint8, d as float32, offset -128 d (the layout is in the kernel's comments; 1.18x the
    file's bytes). One broadcast of 4 activation codes serves 16 rows and each block's float epilogue runs once for
    16 rows, where the file layout's kernel (kquant_vnni's pairs) reduces each row's vector at its end. The
    activations are rounded as there (8 bits per 32), so decode batches (up to VNNI_MAX_ROWS rows) give the file
    layout's numbers up to float32 summation order; larger batches (prefill) go to the weight as loaded (`file`),
    whose C++ dequantization feeds oneDNN 8x faster than unpacking this layout in torch (Llama-3.2-1B Q8_0 prefill:
    38 vs 302 tok/s). It is a view of the mapped file, except for fused projections (a copy: 1.06 bytes a weight
    more, until this layout has a C++ dequantization of its own)."""

    rows: int = 0
    file: BlockWeight | None = None  # the weight as loaded, for prefill

    @staticmethod
    def takes(weight: BlockWeight) -> bool:
        return int(weight.qtype) == Q8_0 and VNNI_MAX_ROWS.get(Q8_0, 0) > 0 and vnni_kernels("x16_vnni") is not None

    @classmethod
    def repack(cls, weight: BlockWeight) -> "X16Blocks":
        rows = weight.blocks.shape[0]
        raw = weight.blocks.view(rows, -1, 34)  # [N, K / 32, 34]: fp16 d, int8 q[32]
        d = raw[..., :2].contiguous().view(torch.float16)[..., 0].float()  # [N, K / 32]
        codes = raw[..., 2:].contiguous().view(torch.int8).to(torch.int16).add(128).to(torch.uint8)  # q + 128
        return cls(interleave_x16(codes.view(rows, -1, 8, 4), d, -128 * d), weight.qtype, rows, weight)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.blocks.shape[1] // X16_Q8_BYTES * GROUP_SIZE))

    def dequantize(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """-> [N, K] as gguf-py dequantizes the file's blocks (d q in float32), in `dtype`."""
        out = self._dequantize_groups(self.blocks)[: self.rows]
        return (out if rows is None else out.index_select(0, rows)).to(dtype)

    @staticmethod
    def _dequantize_groups(packed: torch.Tensor) -> torch.Tensor:
        # [G, K / 32 * 640] -> [16 G, K] float32
        groups = packed.shape[0]
        blocks = packed.view(groups, -1, X16_Q8_BYTES)  # [G, K / 32, 640]
        codes = blocks[..., :512].view(groups, -1, 8, X16_ROWS, 4).permute(0, 3, 1, 2, 4)  # [G, 16, K / 32, 8, 4]
        d = blocks[..., 512:576].contiguous().view(torch.float32).transpose(1, 2)  # [G, 16, K / 32]
        values = (codes.reshape(groups, X16_ROWS, -1, GROUP_SIZE).float() - 128) * d.unsqueeze(-1)
        return values.reshape(groups * X16_ROWS, -1)

    def map_rows(self, fn):
        raise TypeError("X16Blocks is a kernel layout built after loading: map the file's BlockWeight instead")

    def packed(self, dtype: torch.dtype, repack: bool = True) -> "X16Blocks":
        return self

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [T, K] bf16 -> [T, N]
        if takes_integer(Q8_0, x.shape[0]):
            return vnni_kernels("x16_vnni").x16_matmul(x, self.blocks, self.rows, Q8_0, bias)
        if self.file is not None:  # prefill: the weight as loaded, dequantized in C++ for oneDNN
            return self.file.matmul(x, bias)
        chunks = self.blocks.split(PREFILL_CHUNK_ROWS // X16_ROWS)
        out = torch.cat([F.linear(x, self._dequantize_groups(chunk).to(x.dtype)) for chunk in chunks], dim=-1)[:, : self.rows]
        return out if bias is None else out + bias


@functools.cache
def _dequantize_buffer(rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] bf16 scratch for BlockWeight.matmul (the model runs on one thread)."""
    return torch.empty(rows, cols, dtype=torch.bfloat16)


QuantizedWeight = Int4Weight | BlockWeight


class DequantizedMethod:
    """The reference: every quantized weight dequantized to the compute dtype at load, multiplied as dense."""

    name = "dequantized"

    def keeps(self, weight: QuantizedWeight, dtype: torch.dtype) -> bool:
        return False


class KernelMethod(DequantizedMethod):
    """Quantized weights kept as loaded wherever their kernel runs (bfloat16 compute), multiplied by it."""

    name = "kernels"

    def keeps(self, weight: QuantizedWeight, dtype: torch.dtype) -> bool:
        return weight.runs_here(dtype)


QUANT_METHODS: dict[str, DequantizedMethod] = {m.name: m for m in (KernelMethod(), DequantizedMethod())}
DEFAULT_QUANT_METHOD = "kernels"


def quant_method(name: str | None) -> DequantizedMethod:
    """The quant method named, or (None) the kernels."""
    return named(QUANT_METHODS, name or DEFAULT_QUANT_METHOD, "quant method")
