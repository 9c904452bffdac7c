"""Qwen3MoeForCausalLM: the Mixtral layout with Qwen3's attention (per-head RMSNorm on q and k before RoPE,
explicit head_dim). A layer is sparse iff it is not in `mlp_only_layers` and (index + 1) is a multiple of
`decoder_sparse_step`; sparse layers route softmax -> top-k (renormalized only if `norm_topk_prob`) over
experts of width `moe_intermediate_size`, the others run a dense SwiGLU MLP of `intermediate_size`.
Both are named `mlp` in checkpoints; experts are stored per expert (`mlp.experts.<e>.gate_proj...`).
"""

from __future__ import annotations

from torch import nn

from ownllm.config import ModelConfig
from ownllm.layers.mlp import GatedMLP
from ownllm.models.mixtral import MixtralForCausalLM, MixtralSparseMoeBlock, num_experts


def is_sparse_layer(config: ModelConfig, layer_idx: int) -> bool:
    hf = config.hf_config
    step = int(hf.get("decoder_sparse_step") or 1)
    return layer_idx not in (hf.get("mlp_only_layers") or []) and num_experts(config) > 0 and (layer_idx + 1) % step == 0


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    qk_norm = True
    ffn_name = "mlp"
    expert_names = ("gate_proj", "up_proj", "down_proj")

    def feed_forward(self, config: ModelConfig, layer_idx: int) -> nn.Module:
        if is_sparse_layer(config, layer_idx):
            return MixtralSparseMoeBlock(config, renormalize=bool(config.hf_config.get("norm_topk_prob", False)))
        return GatedMLP(config.hidden_size, config.intermediate_size)
