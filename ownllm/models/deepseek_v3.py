"""DeepseekV3ForCausalLM: multi-head latent attention (layers/mla.py) and a DeepSeek MoE feed-forward.

- Attention: MLA with an optional low-rank query (`q_lora_rank` may be null: one q_proj), the compressed
  KV latent cached as is (kv_lora_rank + qk_rope_head_dim values per token and layer), RoPE on the
  rope part only (interleaved pairs if `rope_interleave`), yarn scaling whose mscale also scales the
  softmax (mscale_all_dim).
- Feed-forward: the first `first_k_dense_replace` layers are dense SwiGLU (`intermediate_size`); the rest
  route with sigmoid scores, `e_score_correction_bias` for selection only, group-limited top-k
  (`n_group`, `topk_group`), `norm_topk_prob`, `routed_scaling_factor`, plus `n_shared_experts` shared
  experts (one SwiGLU of n_shared * moe_intermediate_size). The router runs in float32 with a float32
  bias, as transformers keeps it.
Checkpoints store experts per expert (`mlp.experts.<e>.gate_proj.weight`...), adopted as they are. The
multi-token-prediction layer (`model.layers.<num_hidden_layers>.*`) is not read here: models/deepseek_v3_mtp.py
builds it, as a draft for speculative decoding.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.config import ModelConfig
from ownllm.layers.attention import AttentionMetadata, KVCacheSpec
from ownllm.layers.mla import MultiLatentAttention, mla_kv_cache_spec, yarn_softmax_scale
from ownllm.layers.mlp import GatedMLP
from ownllm.layers.module import Module
from ownllm.layers.moe import ExpertTensors, Experts, check_moe_config, grouped_sigmoid_topk
from ownllm.layers.norm import RMSNorm
from ownllm.layers.parallel import lm_head, vocab_embedding
from ownllm.layers.rotary import InterleavedRotaryEmbedding, RotaryEmbedding
from ownllm.models.base import CausalLM


def rope_scaling(config: ModelConfig) -> dict | None:
    """config.rope_scaling with yarn's `factor` filled in the way transformers does when it is absent."""
    scaling = dict(config.rope_scaling or {}) or None
    if scaling and scaling.get("rope_type") == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = config.max_position_embeddings / scaling["original_max_position_embeddings"]
    return scaling


class DeepseekV3TopkRouter(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hf = config.hf_config
        num_experts = int(hf["n_routed_experts"])
        self.weight = nn.Parameter(torch.empty(num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts))
        self.top_k = int(hf["num_experts_per_tok"])
        self.num_groups, self.topk_groups = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
        self.renormalize = bool(hf.get("norm_topk_prob", True))
        self.scaling_factor = float(hf.get("routed_scaling_factor", 1.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, hidden] -> weights [T, k] float32, expert ids [T, k]
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        return grouped_sigmoid_topk(logits, self.top_k, self.e_score_correction_bias, self.num_groups,
                                    self.topk_groups, self.renormalize, self.scaling_factor)


class DeepseekV3MoE(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hf = config.hf_config
        width = int(hf["moe_intermediate_size"])
        self.gate = DeepseekV3TopkRouter(config)
        self.experts = Experts(int(hf["n_routed_experts"]), config.hidden_size, width)
        num_shared = int(hf.get("n_shared_experts") or 0)
        self.shared_experts = GatedMLP(config.hidden_size, width * num_shared) if num_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DeepseekV3DecoderLayer(Module):
    """cache_index: the layer's index in its KV cache (default layer_idx; the MTP layer has a cache of its own)."""

    def __init__(self, config: ModelConfig, layer_idx: int, softmax_scale: float, cache_index: int | None = None) -> None:
        super().__init__()
        hf = config.hf_config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiLatentAttention(config, layer_idx if cache_index is None else cache_index, softmax_scale)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        is_sparse = layer_idx >= int(hf.get("first_k_dense_replace") or 0) and int(hf.get("n_routed_experts") or 0)
        self.mlp = DeepseekV3MoE(config) if is_sparse else GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: RotaryEmbedding) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, rope)
        return x + self.mlp(self.post_attention_layernorm(x))

    def post_load(self) -> None:
        """kv_b_proj split per head, projections fused, the router's weight in float32 (it runs so)."""
        self.self_attn.split_kv_b()
        self.self_attn.fuse()
        mlp = self.mlp
        if isinstance(mlp, DeepseekV3MoE):
            mlp.gate.weight = nn.Parameter(mlp.gate.weight.float(), requires_grad=False)
            mlp = mlp.shared_experts
        if mlp is not None:
            mlp.fuse()


class DeepseekV3Model(Module):
    def __init__(self, config: ModelConfig, softmax_scale: float) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DeepseekV3DecoderLayer(config, i, softmax_scale) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def softmax_scale(config: ModelConfig) -> float:
    hf = config.hf_config
    return yarn_softmax_scale(int(hf["qk_nope_head_dim"]) + int(hf["qk_rope_head_dim"]), rope_scaling(config))


def rotary_embedding(config: ModelConfig) -> RotaryEmbedding:
    """RoPE on the rope part of queries and keys: interleaved pairs unless `rope_interleave` is false."""
    hf = config.hf_config
    rope_cls = InterleavedRotaryEmbedding if hf.get("rope_interleave", True) else RotaryEmbedding
    return rope_cls(int(hf["qk_rope_head_dim"]), config.rope_theta, rope_scaling(config))


def load_deepseek_weights(model: CausalLM, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """CausalLM.load_weights, with each router's selection bias in float32 (selection needs it so)."""
    CausalLM.load_weights(model, tensors, dtype)
    for name, _ in list(model.named_parameters()):
        if name.endswith("gate.e_score_correction_bias"):
            model._set_parameter(name, tensors[name].float())


class DeepseekV3ForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        check_moe_config(config)
        self.model = DeepseekV3Model(config, softmax_scale(config))
        self.lm_head = lm_head(config.hidden_size, config.vocab_size)
        self.rope = rotary_embedding(config)

    @classmethod
    def kv_cache_spec(cls, config: ModelConfig) -> KVCacheSpec:
        return mla_kv_cache_spec(config)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        load_deepseek_weights(self, ExpertTensors(tensors), dtype)

    def fuse_projections(self) -> None:
        for layer in self.model.layers:
            layer.post_load()
