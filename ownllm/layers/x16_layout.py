"""The 16-row interleaved weight layouts of kernels/x16_vnni.cpp (AVX-512) and kernels/x16_avx2.cpp (AVX2): one
vector holds 16 weight rows' codes, 4 bytes each, so one broadcast of 4 activation codes meets 16 rows at once and
each row's sum stays in its own lane."""

from __future__ import annotations

import torch
import torch.nn.functional as F

X16_ROWS = 16  # weight rows interleaved


def interleave_rows(t: torch.Tensor) -> torch.Tensor:
    """[N, S, *parts, bytes] uint8 -> [ceil(N / 16), S, prod(parts) * 16 * bytes]: per group of 16 rows (zero rows
    padding the last) and block, each part's 16 rows side by side (row r's bytes at r * bytes)."""
    rows, groups = t.shape[0], -(-t.shape[0] // X16_ROWS)
    t = F.pad(t, (0,) * (2 * t.dim() - 1) + (groups * X16_ROWS - rows,)).view(groups, X16_ROWS, *t.shape[1:])
    return t.movedim(1, -2).reshape(groups, t.shape[2], -1)


def interleave_x16(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """-> [ceil(N / 16), K / 32 * B] uint8, kernels/x16_vnni.cpp's layout (w = scale * code + offset): per 16 rows
    (zero rows pad the last group) and block of 32 weights, the 16 rows' code bytes 4 at a time (int32 lane r: row
    r's), then their float32 scales, then their offsets (None: none, as x16_avx2's Q8_0 layout). codes: [N, K / 32,
    words, 4] uint8 (word j of a block: its bytes 4j..4j+3); scale, offset: [N, K / 32]."""
    rows, blocks = codes.shape[:2]
    floats = [t.float().contiguous().view(torch.uint8).view(rows, blocks, 4) for t in (scale, offset) if t is not None]
    parts = torch.cat([interleave_rows(part) for part in (codes, *floats)], dim=-1)  # [G, K / 32, B]
    return parts.reshape(parts.shape[0], -1).contiguous()
