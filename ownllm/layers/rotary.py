"""Rotary position embeddings with the rope_scaling variants checkpoints use.

Two layouts: rotate_half (Llama, Qwen, Mistral: dimension i pairs with i + head_dim/2) and
interleaved pairs (Llama 4, DeepSeek: dimension 2i pairs with 2i+1, Meta's complex-number form).
inv_freq is computed exactly as transformers' modeling_rope_utils does, so positions rotate to the
same float32 angles; cos/sin are computed per call from the positions (no table of max_len rows).
Yarn also scales cos and sin by an attention factor, as transformers does.
"""

from __future__ import annotations

import math

import torch

from ownllm.kernels.build import decode_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    # [head_dim // 2]
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """NTK-by-parts interpolation (transformers' _compute_yarn_parameters): high frequencies kept,
    low frequencies divided by `factor`, a linear ramp between beta_fast and beta_slow rotations."""
    factor = scaling["factor"]
    original_len = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original_len / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim)  # [head_dim // 2]
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor transformers multiplies cos and sin by: 1 except for yarn."""
    if (scaling or {}).get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = _default_inv_freq(head_dim, theta)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding:
    """Applies RoPE to q and k given each token's absolute position.

    cos/sin depend only on the positions, so they are computed once per forward (for the first
    layer) and reused by the others: the cache is keyed on the positions tensor itself."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None) -> None:
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [head_dim // 2], float32
        self.attention_factor = rope_attention_factor(scaling)
        self._cached: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """[T, head_dim // 2] float32: each position times each frequency (inv_freq moved to their device once)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return positions.float()[:, None] * self.inv_freq[None, :]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cached
        if cached is not None and cached[0] is positions and cached[1] == dtype:
            return cached[2], cached[3]
        freqs = self.angles(positions)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, head_dim]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        cos, sin = cos.to(dtype), sin.to(dtype)
        self._cached = (positions, dtype, cos, sin)
        return cos, sin

    def __call__(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, num_heads, head_dim]; k: [T, num_kv_heads, head_dim]
        cos, sin = self.cos_sin(positions, q.dtype)
        ops = decode_ops(q)
        if ops is not None:  # in place, the same roundings as below
            ops.rope_rotate_half_(q, k, cos, sin)
            return q, k
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class InterleavedRotaryEmbedding(RotaryEmbedding):
    """RoPE over adjacent pairs (x[2i], x[2i+1]) rotated by angle position * inv_freq[i]: the complex
    multiplication of Meta's Llama 4 (computed the same way, in float32) and of DeepSeek's `rope_interleave`.
    The output keeps the interleaved layout; DeepSeek's transformers code writes the halves out
    de-interleaved instead, which permutes q and k alike and so leaves every attention score unchanged."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None) -> None:
        super().__init__(head_dim, theta, scaling)
        self._cached_cis: tuple[torch.Tensor, torch.Tensor] | None = None

    def rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """[T, 1, head_dim // 2] complex64 unit rotations (times yarn's attention factor), cached per positions."""
        cached = self._cached_cis
        if cached is not None and cached[0] is positions:
            return cached[1]
        freqs = self.angles(positions)
        cis = torch.polar(torch.full_like(freqs, self.attention_factor), freqs)[:, None, :]
        self._cached_cis = (positions, cis)
        return cis

    @staticmethod
    def _rotate(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, head_dim]; cis: [T, 1, head_dim // 2] complex64
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [T, heads, head_dim // 2]
        return torch.view_as_real(pairs * cis).flatten(-2).to(x.dtype)

    def __call__(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, num_heads, head_dim]; k: [T, num_kv_heads, head_dim]; rotated together
        both = self._rotate(torch.cat((q, k), dim=1), self.rotations(positions))  # [T, heads + kv_heads, head_dim]
        return both.split([q.shape[1], k.shape[1]], dim=1)


class MultimodalRotaryEmbedding(RotaryEmbedding):
    """M-RoPE (Qwen2.5-VL): each token has three positions (temporal, height, width) and `mrope_section` splits the
    head_dim / 2 frequencies among them (sections i = 0, 1, 2, ... read axis i % 3), as transformers'
    Qwen2_5_VLRotaryEmbedding recomposes them. Positions [3, T] rotate so; plain positions [T] stand for the same
    position on all three axes, which is ordinary RoPE (text without images)."""

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int]) -> None:
        super().__init__(head_dim, theta, None)
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"config.json: mrope_section {list(mrope_section)} does not add up to head_dim / 2 = "
                             f"{head_dim // 2}")
        self.axis = torch.cat([torch.full((size,), i % 3, device="cpu") for i, size in enumerate(mrope_section)])

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.dim() == 1:
            return super().angles(positions)
        if self.axis.device != positions.device:
            self.axis, self.inv_freq = self.axis.to(positions.device), self.inv_freq.to(positions.device)
        # positions [3, T] -> [T, head_dim // 2]: frequency j turns with the position on axis[j]
        return positions.float().t()[:, self.axis] * self.inv_freq[None, :]

    def at(self, positions: torch.Tensor) -> "PositionedRotary":
        """The rope for one forward whose tokens sit at `positions` [3, T] rather than at meta.positions."""
        return PositionedRotary(self, positions)


class PositionedRotary:
    """A rope called as layers call one, rope(meta.positions, q, k), rotating by other positions (M-RoPE's)."""

    def __init__(self, rope: RotaryEmbedding, positions: torch.Tensor) -> None:
        self.rope, self.positions = rope, positions

    def __call__(self, _: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope(self.positions, q, k)
