"""Mixture-of-experts pieces shared by the MoE model files: routers, stacked experts, checkpoint stacking.

Routers are plain functions from router logits [T, E] to (weights [T, k] float32, expert ids [T, k]):
softmax -> top-k (Mixtral, Qwen3-MoE), top-k -> sigmoid (Llama 4) and sigmoid + bias + group-limited
top-k (DeepSeek-V3). `FusedExperts` holds every expert's SwiGLU weights stacked as
gate_up_proj [E, 2 * I, H] and down_proj [E, H, I] (nn.Linear's [out, in] per expert) and runs them
one of two ways, chosen by its `impl` attribute:
- "reference": every expert on every token, then a dense [T, E] weighting; obviously right, slow.
- "fast": token-expert pairs sorted by expert, one matmul pair per active expert over its tokens, so
  a decode step reads only the weights of the experts its tokens chose.
Both give the same result; the parity tests run both. `ExpertTensors` presents a checkpoint's
per-expert (or differently laid out) tensors under the stacked names, so loading stays a name lookup.
This module never decides which layers are sparse or how a model names its router: the model files do.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.config import ModelConfig
from ownllm.layers.linear import linear
from ownllm.layers.module import Module

MOE_IMPLS = ("fast", "reference")


def check_moe_config(config: ModelConfig) -> None:
    """Refuses what these models cannot run: another activation than SwiGLU's silu, or quantized weights
    (e.g. DeepSeek-V3's block-FP8), which would otherwise load as unscaled values."""
    hf = config.hf_config
    if (act := hf.get("hidden_act", "silu")) != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported for {config.architecture}; only silu")
    if quantization := hf.get("quantization_config"):
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise ValueError(f"config.json: {method} quantized weights are not supported for {config.architecture}; "
                         "use a bfloat16 checkpoint")


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen3-MoE: softmax over all experts in float32, top-k, optionally renormalized to sum 1."""
    probs = logits.float().softmax(dim=-1)  # [T, E]
    weights, ids = probs.topk(top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sigmoid_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4: top-k of the raw logits, each chosen expert weighted by the sigmoid of its logit."""
    top, ids = logits.topk(top_k, dim=-1)  # [T, k]
    return top.float().sigmoid(), ids


def grouped_sigmoid_topk(
    logits: torch.Tensor, top_k: int, correction_bias: torch.Tensor | None, num_groups: int, topk_groups: int,
    renormalize: bool, scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 (noaux_tc): sigmoid scores; the bias steers selection only. Experts split into
    `num_groups` groups scored by the sum of their two best biased scores; only the best `topk_groups`
    groups may be chosen from (a group tied with the last kept one is kept too). Weights are the unbiased
    scores, optionally renormalized, times the factor."""
    scores = logits.float().sigmoid()  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias
    num_tokens, num_experts = choice.shape
    if num_groups > 1 and topk_groups < num_groups:
        grouped = choice.view(num_tokens, num_groups, num_experts // num_groups)  # [T, G, E / G]
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)  # [T, G]
        cutoff = group_scores.topk(topk_groups, dim=-1)[0][:, -1:]  # [T, 1] the worst kept group's score
        choice = grouped.masked_fill((group_scores < cutoff)[:, :, None], float("-inf")).view(num_tokens, num_experts)
    ids = choice.topk(top_k, dim=-1)[1]  # [T, k]
    weights = scores.gather(1, ids)
    if renormalize:
        return weights * (scaling_factor / (weights.sum(dim=-1, keepdim=True) + 1e-20)), ids
    return weights * scaling_factor, ids


class FusedExperts(Module):
    """E SwiGLU experts in two stacked tensors. forward(x, weights, ids) -> Σ_k weights[t, k] * expert_ids[t, k](x[t]),
    or with `scale_input` (Llama 4) Σ_k expert(weights[t, k] * x[t])."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, scale_input: bool = False) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.scale_input = scale_input
        self.impl = "fast"
        self._views: tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None = None

    def per_expert(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each expert's gate_up [2I, H] and down [H, I] weights as a list of views, built once per loaded
        tensor (indexing the stacked tensor on every call costs an op per expert)."""
        if self._views is None or self._views[0] is not self.gate_up_proj:
            self._views = (self.gate_up_proj, list(self.gate_up_proj.unbind(0)), list(self.down_proj.unbind(0)))
        return self._views[1], self._views[2]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; weights: [T, k] float32; ids: [T, k] -> [T, H]
        if self.impl == "reference":
            return self._reference(x, weights, ids)
        return self._fast(x, weights, ids)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        # x: [N, H] -> [N, H] through expert e
        gate_up, down = self.per_expert()
        gate, up = linear(x, gate_up[e]).chunk(2, dim=-1)  # [N, I] each
        return linear(F.silu(gate) * up, down[e])

    def _reference(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(x.shape[0], self.num_experts, dtype=torch.float32).scatter_add_(1, ids, weights)  # [T, E]
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e in range(self.num_experts):
            w = dense[:, e : e + 1]  # [T, 1]
            if self.scale_input:
                out += self._expert(e, (x.float() * w).to(x.dtype)).float()
            else:
                out += self._expert(e, x).float() * w
        return out.to(x.dtype)

    def _fast(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # one gather in, one matmul pair per active expert over a contiguous slice, one gather out; no
        # per-expert scatter (index_add_ on a few rows costs far more than the rows, once threads are involved)
        num_tokens, top_k = ids.shape
        if num_tokens == 1:
            return self._one_token(x, weights[0], ids[0])
        flat_ids = ids.flatten()  # [T * k]
        order = flat_ids.argsort(stable=True)  # token-expert pairs grouped by expert
        pair_weights = weights.flatten()[order][:, None]  # [T * k, 1]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        x_pairs = x.index_select(0, order // top_k)  # [T * k, H]
        if self.scale_input:
            x_pairs = (x_pairs.float() * pair_weights).to(x.dtype)
        outputs, start = [], 0
        for e in (e for e, n in enumerate(counts) if n):
            outputs.append(self._expert(e, x_pairs[start : start + counts[e]]))
            start += counts[e]
        y = torch.cat(outputs).float()  # [T * k, H], sorted by expert
        if not self.scale_input:
            y = y * pair_weights
        y = y.index_select(0, order.argsort())  # back to token-major order
        return y.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [1, H]; weights, ids: [k] -> [1, H]. Reads only the k chosen experts' weights; the elementwise
        # work runs once over all k rows instead of once per expert.
        experts = ids.tolist()
        gate_up_w, down_w = self.per_expert()
        if self.scale_input:
            rows = (x.float() * weights[:, None]).to(x.dtype).split(1)  # k x [1, H]
            gate_up = torch.cat([linear(row, gate_up_w[e]) for row, e in zip(rows, experts)])
        else:
            gate_up = torch.cat([linear(x, gate_up_w[e]) for e in experts])  # [k, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = (F.silu(gate) * up).split(1)  # k x [1, I]
        y = torch.cat([linear(h, down_w[e]) for h, e in zip(hidden, experts)]).float()  # [k, H]
        if self.scale_input:
            return y.sum(dim=0, keepdim=True).to(x.dtype)
        return (weights[None, :] @ y).to(x.dtype)


def set_moe_impl(model: nn.Module, impl: str) -> None:
    """Switches every FusedExperts in `model` to "fast" or "reference"."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"MoE implementation {impl!r} is unknown; choose one of {', '.join(MOE_IMPLS)}")
    for module in model.modules():
        if isinstance(module, FusedExperts):
            module.impl = impl


class ExpertTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors, plus each `<prefix>experts.gate_up_proj` / `.down_proj` built from what the
    checkpoint stores: per-expert Linear weights (`<prefix>experts.<e>.<gate|up|down>.weight`, stacked)
    or, with `transposed`, Llama 4's fused [E, H, 2I] / [E, I, H] tensors (transposed to [out, in])."""

    _STACKED = re.compile(r"(.*\.experts\.)(gate_up_proj|down_proj)$")

    def __init__(self, tensors: Mapping[str, torch.Tensor], num_experts: int,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"), transposed: bool = False,
                 rename: Callable[[str], str] = lambda name: name) -> None:
        self.tensors, self.num_experts, self.names, self.transposed = tensors, num_experts, names, transposed
        self.rename = rename

    def _get(self, name: str) -> torch.Tensor:
        stored = self.rename(name)
        if stored not in self.tensors:
            raise ValueError(f"the checkpoint is missing tensor {stored!r}")
        return self.tensors[stored]

    def __getitem__(self, name: str) -> torch.Tensor:
        match = self._STACKED.match(name)
        if match is None:
            return self._get(name)
        prefix, kind = match.groups()
        if self.transposed:
            return self._get(name).transpose(1, 2).contiguous()
        gate, up, down = self.names
        per_expert = [
            torch.cat([self._get(f"{prefix}{e}.{gate}.weight"), self._get(f"{prefix}{e}.{up}.weight")])
            if kind == "gate_up_proj" else self._get(f"{prefix}{e}.{down}.weight")
            for e in range(self.num_experts)
        ]
        return torch.stack(per_expert)  # [E, 2I, H] or [E, H, I]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and self._STACKED.match(name):
            return True
        return isinstance(name, str) and self.rename(name) in self.tensors

    def __iter__(self) -> Iterator[str]:  # the checkpoint's own names
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)
