"""GGUF weights kept quantized for float32 compute on CPUs without AVX-512 (AVX2 and FMA: most laptops and desktops,
AMD Zen 1-3): every block format repacked at load for kernels/x16_avx2.cpp, which quantizes the activations to 8
bits per block as llama.cpp does and multiplies with integer dot products (the kernel's comments give the layouts).

Q4_0 / Q4_1 and the 5- and 8-bit formats are decoded to unsigned codes with a float32 scale and offset per block
of 32 weights, w = scale * code + offset, exactly the file's weights (gguf-py's dequantization, up to float32
rounding of the product): Q4_0 / Q4_1 keep 4-bit codes (0.75 bytes a weight, file: 0.56-0.63), Q5_0 / Q5_1 / Q5_K
4-bit codes and a vector of fifth bits (0.875, file: 0.69-0.75), Q8_0 a byte a code (1.125, file: 1.06). Q4_K and
Q6_K keep their integer sub-block scales, their bits and their float16 scales: the file's bytes (0.5625 and 0.82).
That is 3.5-7x fewer bytes than the float32 weights these CPUs ran before.

Every batch takes the kernel, prompts too (as the K-quants do on AVX-512), so a row's numbers are the same in
any batch and at prefill as at decode. Weights that must stay views of the file (Linear.keep_file_layout: routed
experts) are dequantized to float32 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ownllm.kernels.build import avx2_kernels, cpu_has_bf16
from ownllm.layers.x16_layout import interleave_rows, interleave_x16

# kernels/x16_avx2.cpp's layouts
Q4_LAYOUT, Q5_LAYOUT, Q8_LAYOUT, Q4K_LAYOUT, Q6K_LAYOUT = 0, 1, 2, 3, 4
# bytes per group of 16 rows and block (32 weights; the K layouts' super-blocks: 256)
LAYOUT_BYTES = {Q4_LAYOUT: 384, Q5_LAYOUT: 448, Q8_LAYOUT: 576, Q4K_LAYOUT: 2368, Q6K_LAYOUT: 3360}
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14  # GGUF type numbers


def float32_kernel(name: str = "x16_avx2"):
    """The AVX2 kernel `name` where models compute in float32 with their weights kept quantized (x16_avx2) or 16-bit
    (half_avx2): CPUs with AVX2 but not the AVX-512 BF16 kernels (where those run, such models compute in bfloat16);
    else None."""
    return None if cpu_has_bf16() else avx2_kernels(name)


@dataclass
class X16Weight:
    """A weight in one of x16_avx2's layouts: `blocks` [ceil(N / 16), K / block * bytes] uint8, N = `rows`."""

    blocks: torch.Tensor
    rows: int
    layout: int
    block: int

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, layout: int) -> "X16Weight":
        """codes [N, K] uint8 (unsigned, w = scale * code + offset), scale and offset [N, K / 32] float32, in layout
        Q4 (codes < 16), Q5 (< 32) or Q8."""
        rows, cols = codes.shape
        if layout in (Q4_LAYOUT, Q5_LAYOUT):  # byte j of a block of 32: code j in its low nibble, j + 16 in its high
            halves = codes.view(rows, cols // 32, 2, 16)
            low = (halves[:, :, 0] & 0x0F) | ((halves[:, :, 1] & 0x0F) << 4)  # [N, K / 32, 16]
            words = [low.view(rows, -1, 4, 4)]
            if layout == Q5_LAYOUT:  # word 4: byte i bit 2b the fifth bit of code 4i + b, bit 2b + 1 of 16 + 4i + b
                fifth = ((halves >> 4) & 1).view(rows, cols // 32, 2, 4, 4).to(torch.int32)  # [N, K / 32, 2, i, b]
                shifts = 2 * torch.arange(4, dtype=torch.int32) + torch.arange(2, dtype=torch.int32)[:, None, None]
                words.append((fifth << shifts).sum((2, 4)).to(torch.uint8).view(rows, -1, 1, 4))
            words = torch.cat(words, dim=2)  # [N, K / 32, words, 4]
        else:
            words = codes.view(rows, cols // 32, 8, 4)
        return cls(interleave_x16(words, scale, None if layout == Q8_LAYOUT else offset), rows, layout, 32)

    @classmethod
    def from_file(cls, blocks: torch.Tensor, qtype: int) -> "X16Weight":
        """GGUF blocks [N, K / W * bytes] of type `qtype` -> their x16_avx2 layout."""
        if qtype in (Q4_K, Q6_K):
            pack = _q4_k_layout if qtype == Q4_K else _q6_k_layout
            return cls(pack(blocks.numpy()), blocks.shape[0], Q4K_LAYOUT if qtype == Q4_K else Q6K_LAYOUT, 256)
        codes, scale, offset, _ = decode_blocks(blocks.numpy(), qtype)
        layout = Q4_LAYOUT if qtype in (Q4_0, Q4_1) else Q8_LAYOUT if qtype == Q8_0 else Q5_LAYOUT
        return cls.from_codes(*(torch.from_numpy(t) for t in (codes, scale, offset)), layout)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.blocks.shape[1] // LAYOUT_BYTES[self.layout] * self.block))

    @property
    def activation_block(self) -> int:
        """The kernel quantizes activations to 8 bits per this many values."""
        return min(self.block, 32)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [T, K] float32 -> [T, N]
        return avx2_kernels().x16_matmul_avx2(x, self.blocks, self.rows, self.layout, self.block, bias)


@dataclass
class DenseWeight:
    """A quantized weight dequantized at load (where it must not be repacked), multiplied by torch."""

    weight: torch.Tensor  # [N, K]

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


# --- GGUF blocks -> (codes, scale, offset) --------------------------------------------------------------------


def decode_blocks(raw: np.ndarray, qtype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """raw [N, K / W * bytes] uint8 GGUF blocks -> (codes [N, K] uint8, scale [N, K / B] float32, offset [N, K / B]
    float32, B) with w = scale * code + offset (the layouts are gguf-py's, gguf/quants.py)."""
    rows = raw.shape[0]
    if qtype not in _DECODERS:
        raise ValueError(f"GGUF type {qtype} has no x16_avx2 layout")
    bytes_per_block = _BLOCK_BYTES[qtype]
    codes, scale, offset, block = _DECODERS[qtype](raw.reshape(-1, bytes_per_block))
    return (codes.reshape(rows, -1), scale.reshape(rows, -1).astype(np.float32),
            offset.reshape(rows, -1).astype(np.float32), block)


_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q8_0: 34, Q5_K: 176, Q6_K: 210}


def _f16(b: np.ndarray) -> np.ndarray:  # [n, 2] uint8 -> [n, 1] float32
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes of a block of 32 (low nibbles: codes 0-15, high: 16-31) -> [n, 32] codes."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes, bit j of the little-endian word the fifth bit of code j -> [n, 32] of 0 or 16."""
    return (np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little") << 4).astype(np.uint8)


def _q4_0(b):
    d = _f16(b[:, :2])
    return _nibbles32(b[:, 2:]), d, -8 * d, 32


def _q4_1(b):
    return _nibbles32(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4]), 32


def _q5_0(b):
    d = _f16(b[:, :2])
    return _nibbles32(b[:, 6:]) | _high_bits32(b[:, 2:6]), d, -16 * d, 32


def _q5_1(b):
    return _nibbles32(b[:, 8:]) | _high_bits32(b[:, 4:8]), _f16(b[:, :2]), _f16(b[:, 2:4]), 32


def _q8_0(b):
    d = _f16(b[:, :2])
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d, 32


def _k_sub_scales(b):
    """Q4_K / Q5_K: the 6-bit sc and m [n, 8] uint8 of each sub-block of 32 (w = d sc q - dmin m)."""
    s = b[:, 4:16].reshape(-1, 3, 4)
    sc = np.concatenate([s[:, 0] & 0x3F, (s[:, 2] & 0x0F) | ((s[:, 0] >> 2) & 0x30)], axis=-1)
    m = np.concatenate([s[:, 1] & 0x3F, (s[:, 2] >> 4) | ((s[:, 1] >> 2) & 0x30)], axis=-1)
    return sc, m


def _k_scales(b):
    """Q4_K / Q5_K: [n, 8] scale d * sc and offset -dmin * m of each sub-block of 32."""
    sc, m = _k_sub_scales(b)
    return _f16(b[:, :2]) * sc.astype(np.float32), -(_f16(b[:, 2:4]) * m.astype(np.float32))


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 128] bytes: each 32 hold sub-block 2i in their low nibbles, 2i + 1 in their high ones -> [n, 256]."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 256)


def _q5_k(b):
    high = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # [n, 8, 32]
    return (_k_nibbles(b[:, 48:176]) | (high.reshape(-1, 256) << 4), *_k_scales(b), 32)


def _q6_k(b):
    low = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    high = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = (low & 0x0F).reshape(-1, 256) | ((high & 0x03).reshape(-1, 256) << 4)  # 0..63, w = d sc (q - 32)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    return codes, scale, -32 * scale, 16


_DECODERS = {Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q8_0: _q8_0, Q5_K: _q5_k, Q6_K: _q6_k}  # Q4_K: below


# --- Q4_K and Q6_K -> kQ4K and kQ6K (integer sub-block scales; the kernel's comments give the layouts) ------------


def _interleaved(parts: list[np.ndarray], rows: int) -> torch.Tensor:
    """Each super-block's parts [N * S, ...] (numbers of any type) -> [ceil(N / 16), S * bytes] uint8: per group of
    16 rows and super-block, each part's bytes with the 16 rows side by side, the parts one after another."""
    def as_bytes(values: np.ndarray) -> torch.Tensor:  # [N * S, ..., last] -> [N, S, ..., last * itemsize] uint8
        t = torch.from_numpy(np.ascontiguousarray(values))
        return t.view(torch.uint8).view(rows, -1, *t.shape[1:-1], t.shape[-1] * t.element_size())

    interleaved = torch.cat([interleave_rows(as_bytes(part)) for part in parts], dim=-1)  # [G, S, bytes]
    return interleaved.reshape(interleaved.shape[0], -1).contiguous()


def _nibble_words(codes: np.ndarray) -> np.ndarray:
    """[n, 256] 4-bit codes -> [n, 8, 4, 4]: per 32, byte j holding code j and j + 16 (kQ4's words of 4 bytes)."""
    c = codes.reshape(-1, 8, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 8, 4, 4)


def _q4_k_layout(raw: np.ndarray) -> torch.Tensor:
    rows = raw.shape[0]
    b = raw.reshape(-1, 144)
    sc, m = _k_sub_scales(b)
    return _interleaved([_nibble_words(_k_nibbles(b[:, 16:144])), sc[..., None], m[..., None], b[:, :2], b[:, 2:4]],
                        rows)  # d and dmin as the file's float16


def _q6_k_layout(raw: np.ndarray) -> torch.Tensor:
    rows = raw.shape[0]
    b = raw.reshape(-1, 210)
    codes, scale, _, _ = _q6_k(b)  # codes 0..63 [n, 256]
    top = (codes >> 4).reshape(-1, 8, 2, 16)
    top = (top[:, :, 0] | (top[:, :, 1] << 2)).reshape(-1, 8, 4, 4)  # per code byte: its two codes' top bits
    vectors = np.concatenate([_nibble_words(codes & 0x0F), top[:, :, 0::2] | (top[:, :, 1::2] << 4)], axis=2)
    return _interleaved([vectors, b[:, 192:208][..., None], b[:, 208:210]], rows)  # d as the file's float16
