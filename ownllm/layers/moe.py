"""Mixture-of-experts pieces shared by the MoE model files: routers, the experts, checkpoint name mapping.

Routers are plain functions from router logits [T, E] to (weights [T, k] float32, expert ids [T, k]):
softmax -> top-k (Mixtral, Qwen3-MoE), top-k -> sigmoid (Llama 4) and sigmoid + bias + group-limited
top-k (DeepSeek-V3). `Experts` holds E SwiGLU experts, each its own gate/up/down weights as loaded
(memory-mapped views when no conversion is needed), and runs them through one of two MoE backends (an
interface and a registry, MOE_BACKENDS; the runner picks one by name when it builds the model):
- "reference": every expert on every token, then a dense [T, E] weighting; obviously right, slow.
- "fast": token-expert pairs sorted by expert, one call per active expert over its tokens, so a decode
  step reads only the weights of the experts its tokens chose; one token in bfloat16 runs all its k
  experts in one kernel call (kernels/moe_experts.cpp).
Both give the same result; the parity tests run both. `ExpertTensors` finds each expert's tensors in
a checkpoint's layout (per expert, or Llama 4's fused 3-D tensors) without copying them.
This module never decides which layers are sparse or how a model names its router: the model files do.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from ownllm.config import ModelConfig
from ownllm.distributed.parallel_state import divide, tp_group
from ownllm.kernels.build import bf16_kernels_for
from ownllm.layers.linear import Linear
from ownllm.layers.module import Module
from ownllm.layers.registry import named

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


class SwiGLUExpert(Module):
    """One expert: gate, up and down projections as the checkpoint stores them (HF names)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        for linear in (self.gate_proj, self.up_proj, self.down_proj):
            linear.keep_file_layout = True  # experts stay views of the mapped file (see Experts), not repacked copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, H] -> [N, H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(Module):
    """E SwiGLU experts (children "0".."E-1"; with tensor parallel, each rank's E / T of them: see _own_experts).
    forward(x, weights, ids) -> Σ_k weights[t, k] * expert_ids[t, k](x[t]), or with `scale_input` (Llama 4)
    Σ_k expert(weights[t, k] * x[t]).

    Each expert keeps the tensors the loader gave it: views of the memory-mapped checkpoint when no dtype
    conversion is needed, so a model larger than RAM loads, and a decode step pages in only the experts it
    uses. Stacking them into one [E, ...] tensor would copy every expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, scale_input: bool = False) -> None:
        super().__init__()
        tp = tp_group()  # expert parallel: each rank holds experts first_expert .. first_expert + num_experts - 1
        self.num_experts = divide(num_experts, tp.size, "experts")
        self.first_expert = tp.rank * self.num_experts
        self.intermediate_size = intermediate_size
        own = range(self.first_expert, self.first_expert + self.num_experts)
        for e in own:
            self.add_module(str(e), SwiGLUExpert(hidden_size, intermediate_size))
        self.experts = [self._modules[str(e)] for e in own]
        self.scale_input = scale_input
        self.backend: ReferenceMoE = MOE_BACKENDS[DEFAULT_MOE_BACKEND]  # the runner's choice, bound at load
        self._weights: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None

    def per_expert(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None:
        """Every expert's gate [I, H], up [I, H] and down [H, I] weights when all are dense bf16 and row-major
        (what the one-token kernel reads), else None. Looked up again only when expert 0's gate weight is
        replaced (loading replaces them all). Llama 4's transposed views are not row-major: they run on torch."""
        first = self.experts[0].gate_proj.weight
        if self._weights is None or self._weights[0][0] is not first:
            lists = tuple([getattr(expert, name).weight for expert in self.experts]
                          for name in ("gate_proj", "up_proj", "down_proj"))
            usable = all(w is not None and w.dtype == torch.bfloat16 and w.is_contiguous() for ws in lists for w in ws)
            self._weights = lists if usable else ([first], [], [])
        return self._weights if self._weights[1] else None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; weights: [T, k] float32; ids: [T, k] -> [T, H]
        tp = tp_group()
        if tp.size == 1:
            return self.backend.forward(self, x, weights, ids)
        return tp.all_reduce(self._own_experts(x, weights, ids))

    def _own_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Expert parallel: the contribution of this rank's experts; the others' pairs go to its first expert with
        weight 0, which adds exact zeros (with scale_input too: a SwiGLU expert maps 0 to 0)."""
        is_own = (ids >= self.first_expert) & (ids < self.first_expert + self.num_experts)  # [T, k]
        local_ids = torch.where(is_own, ids - self.first_expert, 0)
        return self.backend.forward(self, x, torch.where(is_own, weights, 0.0), local_ids)


class ReferenceMoE:
    """The plain-torch reference: every expert on every token, then a dense [T, E] weighting."""

    name = "reference"

    def forward(self, experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(x.shape[0], experts.num_experts, dtype=torch.float32, device=x.device).scatter_add_(1, ids, weights)  # [T, E]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, expert in enumerate(experts.experts):
            w = dense[:, e : e + 1]  # [T, 1]
            if experts.scale_input:
                out += expert((x.float() * w).to(x.dtype)).float()
            else:
                out += expert(x).float() * w
        return out.to(x.dtype)


class FastMoE(ReferenceMoE):
    """Only the chosen experts, each once over its tokens; one bf16 token through kernels/moe_experts.cpp."""

    name = "fast"

    def forward(self, experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # one gather in, one expert call per active expert over a contiguous slice, one gather out; no
        # per-expert scatter (index_add_ on a few rows costs far more than the rows, once threads are involved)
        num_tokens, top_k = ids.shape
        if num_tokens == 1:
            return self.one_token(experts, x, weights[0], ids[0])
        flat_ids = ids.flatten()  # [T * k]
        order = flat_ids.argsort(stable=True)  # token-expert pairs grouped by expert
        pair_weights = weights.flatten()[order][:, None]  # [T * k, 1]
        counts = torch.bincount(flat_ids, minlength=experts.num_experts).tolist()
        x_pairs = x.index_select(0, order // top_k)  # [T * k, H]
        if experts.scale_input:
            x_pairs = (x_pairs.float() * pair_weights).to(x.dtype)
        outputs, start = [], 0
        for e in (e for e, n in enumerate(counts) if n):
            outputs.append(experts.experts[e](x_pairs[start : start + counts[e]]))
            start += counts[e]
        y = torch.cat(outputs).float()  # [T * k, H], sorted by expert
        if not experts.scale_input:
            y = y * pair_weights
        y = y.index_select(0, order.argsort())  # back to token-major order
        return y.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)

    def one_token(self, experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # x: [1, H]; weights, ids: [k] -> [1, H]. Reads only the k chosen experts' weights.
        chosen = ids.tolist()
        kernel = bf16_kernels_for("moe_experts", x)
        if kernel is not None and (lists := experts.per_expert()) is not None:
            gate, up, down = ([ws[e] for e in chosen] for ws in lists)
            return kernel.experts_one_token(x, gate, up, down, weights, experts.scale_input)
        if experts.scale_input:
            rows = (x.float() * weights[:, None]).to(x.dtype).split(1)  # k x [1, H]
            return torch.cat([experts.experts[e](row) for row, e in zip(rows, chosen)]).float().sum(
                dim=0, keepdim=True).to(x.dtype)
        y = torch.cat([experts.experts[e](x) for e in chosen]).float()  # [k, H]
        return (weights[None, :] @ y).to(x.dtype)


MOE_BACKENDS: dict[str, ReferenceMoE] = {b.name: b for b in (ReferenceMoE(), FastMoE())}
DEFAULT_MOE_BACKEND = "fast"


def moe_backend(name: str | None) -> ReferenceMoE:
    """The MoE backend named, or (None) the fast one."""
    return named(MOE_BACKENDS, name or DEFAULT_MOE_BACKEND, "MoE backend")


class ExpertTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors, with each expert's `<prefix>experts.<e>.<gate_proj|up_proj|down_proj>.weight`
    found where the checkpoint keeps it: under its own name (renamed by `names`, e.g. Mixtral's w1/w3/w2), or
    as a view [out, in] into Llama 4's fused `<prefix>experts.gate_up_proj` [E, H, 2I] / `.down_proj` [E, I, H].
    Nothing is copied: memory-mapped tensors stay mapped."""

    _EXPERT = re.compile(r"(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    _ROLES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, tensors: Mapping[str, torch.Tensor], names: tuple[str, str, str] = _ROLES,
                 rename: Callable[[str], str] = lambda name: name) -> None:
        self.tensors, self.names, self.rename = tensors, names, rename

    def _get(self, name: str) -> torch.Tensor:
        stored = self.rename(name)
        if stored not in self.tensors:
            raise ValueError(f"the checkpoint is missing tensor {stored!r}")
        return self.tensors[stored]

    def __getitem__(self, name: str) -> torch.Tensor:
        match = self._EXPERT.match(name)
        if match is None:
            return self._get(name)
        prefix, expert, role = match.groups()
        own_name = f"{prefix}{expert}.{self.names[self._ROLES.index(role)]}.weight"
        fused_name = f"{prefix}{'down_proj' if role == 'down_proj' else 'gate_up_proj'}"
        if self.rename(own_name) in self.tensors or self.rename(fused_name) not in self.tensors:
            return self._get(own_name)
        stacked = self._get(fused_name)
        if int(expert) >= stacked.shape[0]:
            raise ValueError(f"the checkpoint's {self.rename(fused_name)!r} has {stacked.shape[0]} experts, not {int(expert) + 1}")
        fused = stacked[int(expert)]  # [H, 2I] (gate then up) or [I, H]: [in, out]
        if role == "down_proj":
            return fused.t()
        width = fused.shape[1] // 2
        return (fused[:, :width] if role == "gate_proj" else fused[:, width:]).t()

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if self.rename(name) in self.tensors:  # stored under its own name: no need to read it
            return True
        try:
            self[name]
        except ValueError:
            return False
        return True

    @property
    def get_slice(self):
        """The checkpoint's lazy slices (safetensors), for tensor-parallel shards of non-expert tensors; or None."""
        inner = getattr(self.tensors, "get_slice", None)
        return None if inner is None else (lambda name: inner(self.rename(name)))

    def __iter__(self) -> Iterator[str]:  # the checkpoint's own names
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)
