"""Gemma3ForCausalLM (Gemma 3 text: 270M, 1B) and Gemma3ForConditionalGeneration (4B, 12B, 27B: the same decoder
with a SigLIP vision tower and Gemma 3's projector).

What differs from Llama (transformers' modeling_gemma3.py):
- Embeddings scaled by sqrt(hidden_size), rounded to the model dtype first (55.4256 is 55.5 in bfloat16).
- RMSNorm scales by (1 + weight) (layers/norm.py GemmaRMSNorm), on q and k per head too; four norms per layer:
  x += post_attention_layernorm(attn(input_layernorm(x))); x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))).
- GeGLU MLP (gelu_pytorch_tanh).
- Interleaved local and global layers (config.layer_types): local ones attend within `sliding_window` and rotate
  with their own rope (config.sliding_rope: `rope_local_base_freq`, no scaling); global ones use rope_theta and
  rope_scaling.
- Attention scale query_pre_attn_scalar**-0.5; tanh soft-capping of the final logits where the config sets it;
  embeddings tied to the lm_head. A config's attn_logit_softcapping is ignored, as transformers' Gemma 3 and
  llama.cpp's gemma3 ignore it (Gemma 2 capped attention scores; Gemma 3 replaced that with q/k norms).

The image side (Gemma3ForConditionalGeneration.embed_images): the tower's last hidden state [patches, vision hidden]
is average-pooled on the patch grid down to mm_tokens_per_image rows, RMS-normalized (mm_soft_emb_norm, Gemma's
1 + weight) and multiplied by mm_input_projection_weight [vision hidden, text hidden]; the rows replace the
placeholder tokens' (scaled) embeddings. Checkpoints keep the parts under LLaVA's names (models/llava.py).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ownllm.config import ModelConfig
from ownllm.layers.attention import AttentionMetadata
from ownllm.layers.embedding import Embedding
from ownllm.layers.linear import Linear
from ownllm.layers.mlp import GatedMLP, activation
from ownllm.layers.module import Module
from ownllm.layers.norm import GemmaRMSNorm
from ownllm.layers.rotary import RotaryEmbedding
from ownllm.models.base import CausalLM, RenamedTensors
from ownllm.models.llama import LlamaAttention
from ownllm.models.llava import checkpoint_names
from ownllm.models.siglip_vision import SiglipVisionModel


class Gemma3DecoderLayer(Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = LlamaAttention(config, layer_idx, config.attention_bias, config.attention_bias,
                                        qk_norm=True, norm=GemmaRMSNorm)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = GatedMLP(hidden, config.intermediate_size, act=config.hidden_act)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: RotaryEmbedding) -> torch.Tensor:
        # x: [T, hidden]
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), meta, rope))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3TextModel(Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if config.hf_config.get("use_bidirectional_attention"):
            raise ValueError("config.json: use_bidirectional_attention (an embedding model) is not supported for "
                             f"{config.architecture}")
        activation(config.hidden_act, config.architecture)  # a clear error for an unknown one
        self.model = Gemma3TextModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.local_rope = RotaryEmbedding(config.head_dim, *config.sliding_rope) if config.sliding_rope else self.rope
        # sqrt(hidden_size) in the model dtype, as transformers' Gemma3TextScaledWordEmbedding multiplies
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5, device="cpu").to(getattr(torch, config.dtype)))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> scaled token embeddings [T, hidden_size]."""
        return self.model.embed_tokens(input_ids) * self.embed_scale

    def hidden_states(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """As CausalLM's, each layer rotating with its own kind's rope."""
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds  # [T, hidden]
        for layer in self.model.layers:
            x = layer(x, meta, self.local_rope if layer.is_sliding else self.rope)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden_size] -> [N, vocab_size]
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3MultiModalProjector(Module):
    def __init__(self, vision_hidden: int, text_hidden: int, patches_per_side: int, tokens_per_image: int,
                 eps: float) -> None:
        super().__init__()
        tokens_per_side = int(tokens_per_image**0.5)
        if tokens_per_side**2 != tokens_per_image or patches_per_side % tokens_per_side:
            raise ValueError(f"config.json: mm_tokens_per_image {tokens_per_image} is not a square that divides the "
                             f"vision tower's {patches_per_side}x{patches_per_side} patches")
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vision_hidden, text_hidden))
        self.mm_soft_emb_norm = GemmaRMSNorm(vision_hidden, eps)
        self.patches_per_side, self.kernel_size = patches_per_side, patches_per_side // tokens_per_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, patches, vision_hidden] -> [B, tokens_per_image, text_hidden]
        batch, _, hidden = x.shape
        grid = x.transpose(1, 2).reshape(batch, hidden, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel_size, self.kernel_size).flatten(2).transpose(1, 2)  # [B, tokens, hidden]
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).to(x.dtype)


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        hf = config.hf_config
        vision = hf.get("vision_config") or {}
        if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ValueError(f"Gemma 3 with a {vision.get('model_type')!r} vision tower is not supported (SigLIP only)")
        self.vision_tower = SiglipVisionModel(vision)
        tower = self.vision_tower
        self.multi_modal_projector = Gemma3MultiModalProjector(
            tower.post_layernorm.normalized_shape[0], config.hidden_size, tower.image_size // tower.patch_size,
            int(hf.get("mm_tokens_per_image", 256)), tower.post_layernorm.eps)

    def load_weights(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().load_weights(RenamedTensors(tensors, checkpoint_names), dtype)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [B, 3, image_size, image_size] -> [B, mm_tokens_per_image, hidden_size] (transformers'
        get_image_features)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed_images(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """[3, H, W] per image (all the tower's size, as Gemma 3 preprocessing makes them) -> [tokens, hidden] each."""
        return list(self.image_features(torch.stack(pixel_values)).unbind(0))
