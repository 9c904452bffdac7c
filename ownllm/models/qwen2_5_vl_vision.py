"""Qwen2.5-VL's vision transformer (transformers' Qwen2_5_VisionTransformerPretrainedModel): one image's patch rows ->
one row per merged 2x2 (spatial_merge_size**2) patch block, in the text model's hidden size.

- Patch embedding: a bias-free Conv3d whose kernel is the whole patch (temporal_patch_size frames x patch_size x
  patch_size), so it is a matmul of each flattened patch row by the kernel.
- 2D rotary positions: each patch's (row, column) on the patch grid, half the rotated dims turning with the row and
  half with the column (head_dim / 4 frequencies each), applied rotate-half style over the whole head.
- Window attention: the merged-patch grid is cut into windows of window_size / patch_size / merge pixels a side
  (partial ones at the right and bottom edges); the patches are permuted so each window's are contiguous, blocks
  attend within their window, except those in `fullatt_block_indexes`, which attend over the whole frame. The
  permutation is undone after the merger.
- Blocks: pre-norm RMSNorm (eps 1e-6), biased fused qkv and proj, a biased SwiGLU MLP.
- The patch merger: RMSNorm, the merge_size**2 patch rows of a block concatenated, Linear, GELU, Linear.
Attention runs once per run of equal-length segments (all full windows of an image in one SDPA call). Parameter names
are transformers' (`patch_embed.proj`, `blocks.N.attn.qkv`, `merger.mlp.0`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.layers.attention import attention_dtype
from ownllm.layers.linear import Linear
from ownllm.layers.mlp import GatedMLP, activation
from ownllm.layers.module import Module
from ownllm.layers.norm import RMSNorm

VISION_EPS = 1e-6  # transformers' Qwen2_5_VLRMSNorm(..., eps=1e-6) in the tower, whatever the config says


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def segmented_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                        scale: float) -> torch.Tensor:
    """q, k, v: [N, heads, head_dim]; rows cut into consecutive segments of `lengths`, each attending within itself
    (bidirectional) -> [N, heads, head_dim]. Runs of equal-length segments are batched into one SDPA call."""
    out, start, i = [], 0, 0
    while i < len(lengths):
        length, count = lengths[i], 1
        while i + count < len(lengths) and lengths[i + count] == length:
            count += 1
        end = start + count * length

        def batch(t: torch.Tensor) -> torch.Tensor:  # [count * length, heads, d] -> [count, heads, length, d]
            return t[start:end].reshape(count, length, *t.shape[1:]).transpose(1, 2)

        o = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), scale=scale)  # [count, heads, length, d]
        out.append(o.transpose(1, 2).reshape(end - start, *q.shape[1:]))
        start, i = end, i + count
    return torch.cat(out) if len(out) > 1 else out[0]


class VisionAttention(Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.qkv = Linear(hidden, 3 * hidden, bias=True)
        self.proj = Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        # x: [N, hidden]; cos, sin: [N, 1, head_dim] float32
        num = x.shape[0]
        q, k, v = self.qkv(x).reshape(num, 3, self.num_heads, self.head_dim).unbind(1)  # [N, heads, head_dim] each
        dtype = attention_dtype(q)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype).to(dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype).to(dtype)
        out = segmented_attention(q, k, v.to(dtype), lengths, self.head_dim**-0.5)
        return self.proj(out.reshape(num, -1).to(x.dtype))


class VisionBlock(Module):
    def __init__(self, hidden: int, intermediate: int, num_heads: int, act: str) -> None:
        super().__init__()
        self.norm1 = RMSNorm(hidden, VISION_EPS)
        self.norm2 = RMSNorm(hidden, VISION_EPS)
        self.attn = VisionAttention(hidden, num_heads)
        self.mlp = GatedMLP(hidden, intermediate, bias=True, act=act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(Module):
    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, hidden: int) -> None:
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, hidden, kernel, stride=kernel, bias=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # rows: [N, C * T * P * P] -> [N, hidden]: the kernel covers each patch whole
        weight = self.proj.weight
        return F.linear(rows.to(weight.dtype), weight.reshape(weight.shape[0], -1))


class PatchMerger(Module):
    def __init__(self, context_dim: int, out_dim: int, merge_size: int) -> None:
        super().__init__()
        self.merged_dim = context_dim * merge_size**2
        self.ln_q = RMSNorm(context_dim, VISION_EPS)
        self.mlp = nn.Sequential(Linear(self.merged_dim, self.merged_dim, bias=True), nn.GELU(),
                                 Linear(self.merged_dim, out_dim, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, context_dim], merge_size**2 consecutive rows per block -> [N / merge_size**2, out_dim]
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))


def window_index(grid_t: int, rows: int, columns: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """On a merged-patch grid (frames x rows x columns, row-major): the order that makes each window x window tile of
    a frame contiguous (tiles row-major, partial ones at the edges) -> (that permutation [t * rows * columns], each
    tile's number of merged patches)."""
    index = torch.arange(grid_t * rows * columns, device="cpu").reshape(grid_t, rows, columns)
    pad_rows, pad_columns = -rows % window, -columns % window
    padded = F.pad(index, (0, pad_columns, 0, pad_rows), value=-1)
    tiles_down, tiles_across = (rows + pad_rows) // window, (columns + pad_columns) // window
    tiles = padded.reshape(grid_t, tiles_down, window, tiles_across, window).permute(0, 1, 3, 2, 4)
    tiles = tiles.reshape(-1, window * window)  # [tiles, window * window], -1 where padded
    sizes = (tiles >= 0).sum(-1)
    order = tiles.flatten()
    return order[order >= 0], [int(s) for s in sizes if s > 0]


class Qwen2_5_VisionTransformer(Module):
    """vision_config: the checkpoint's `vision_config` dict (Qwen2_5_VLVisionConfig's keys and defaults)."""

    def __init__(self, vision_config: dict, architecture: str = "Qwen2_5_VLForConditionalGeneration") -> None:
        super().__init__()
        c = vision_config
        hidden, num_heads = int(c.get("hidden_size", 1280)), int(c.get("num_heads", 16))
        act = str(c.get("hidden_act", "silu"))
        activation(act, architecture)  # a clear error for an unknown one
        self.patch_size = int(c.get("patch_size", 14))
        self.merge_size = int(c.get("spatial_merge_size", 2))
        self.window_size = int(c.get("window_size", 112))
        self.merge_window = self.window_size // self.merge_size // self.patch_size
        if self.merge_window < 1:
            raise ValueError(f"config.json: vision_config window_size {self.window_size} is smaller than a merged "
                             f"patch ({self.merge_size} x {self.patch_size} pixels)")
        self.fullatt_block_indexes = {int(i) for i in c.get("fullatt_block_indexes", [7, 15, 23, 31])}
        self.patch_embed = PatchEmbed(int(c.get("in_channels", 3)), int(c.get("temporal_patch_size", 2)),
                                      self.patch_size, hidden)
        self.blocks = nn.ModuleList(VisionBlock(hidden, int(c.get("intermediate_size", 3420)), num_heads, act)
                                    for _ in range(int(c.get("depth", 32))))
        self.merger = PatchMerger(hidden, int(c.get("out_hidden_size", 3584)), self.merge_size)
        head_dim = hidden // num_heads
        theta = float((c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        spatial = head_dim // 2  # half the head turns with the row, half with the column
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device="cpu") / spatial))

    def post_load(self) -> None:
        for block in self.blocks:
            block.mlp.fuse()

    def rotary(self, grid_t: int, rows: int, columns: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [t * rows * columns, 1, head_dim] float32 of the patches in merge-block order (see forward)."""
        m = self.merge_size
        row_ids = torch.arange(rows, device=device)[:, None].expand(rows, columns)
        column_ids = torch.arange(columns, device=device)[None, :].expand(rows, columns)

        def blocked(ids: torch.Tensor) -> torch.Tensor:  # row-major grid -> merge-block order
            return ids.reshape(rows // m, m, columns // m, m).transpose(1, 2).flatten()

        inv_freq = self.inv_freq.to(device)
        row_angles = blocked(row_ids)[:, None].float() * inv_freq  # [rows * columns, head_dim / 4]
        column_angles = blocked(column_ids)[:, None].float() * inv_freq
        angles = torch.cat((row_angles, column_angles), dim=-1).repeat(grid_t, 1)  # [N, head_dim / 2]
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]
        return emb.cos(), emb.sin()

    def forward(self, pixel_rows: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """pixel_rows: [t * rows * columns, C * T * P * P], one image's patches in merge-block order (2x2 blocks
        row-major, each block's patches row-major, as Qwen2VLImageProcessor flattens them); grid: (t, rows, columns)
        of patches -> [t * rows * columns / merge**2, out_hidden_size]."""
        grid_t, rows, columns = grid
        m, unit = self.merge_size, self.merge_size**2
        num = grid_t * rows * columns
        order, tiles = window_index(grid_t, rows // m, columns // m, self.merge_window)
        order = order.to(pixel_rows.device)

        def windowed(x: torch.Tensor) -> torch.Tensor:  # [N, ...] -> the window order, block by block
            return x.reshape(num // unit, unit, *x.shape[1:])[order].reshape(x.shape)

        x = windowed(self.patch_embed(pixel_rows))  # [N, hidden]
        cos, sin = (windowed(t) for t in self.rotary(grid_t, rows, columns, x.device))
        window_lengths = [size * unit for size in tiles]
        frame_lengths = [rows * columns] * grid_t
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frame_lengths if i in self.fullatt_block_indexes else window_lengths)
        merged = self.merger(x)  # [N / unit, out], in the window order
        return merged[torch.argsort(order)]
