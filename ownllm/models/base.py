"""What every causal LM shares: building on the meta device and adopting checkpoint tensors as weights.

Weights are taken from the loader's tensors by their Hugging Face names. A tensor already in the
compute dtype is adopted as is (a memory-mapped safetensors tensor stays mapped, no second copy);
otherwise it is converted once, tensor by tensor. The pluggable pieces the runner chose (LayerBackends) are
bound as the model loads: the quant method decides which quantized weights stay so, and every MoE and MLA
layer gets its backend; they do not change afterwards.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ownllm.config import ModelConfig
from ownllm.distributed.parallel_state import tp_group
from ownllm.layers.attention import AttentionMetadata, KVCacheSpec
from ownllm.layers.backends import LayerBackends
from ownllm.layers.embedding import Embedding
from ownllm.layers.linear import Linear
from ownllm.layers.mla import MultiLatentAttention
from ownllm.layers.module import Module
from ownllm.layers.moe import Experts
from ownllm.layers.parallel import load_shard
from ownllm.layers.quant import BlockWeight, Int4Weight, QuantizedWeight


class CausalLM(Module):
    # checkpoint tensors that carry no weights of ours (e.g. precomputed rotary tables)
    ignored_tensor_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    decode_stack = None  # layers/decode_stack.py's DecodeStack, where post_load found the layers fit it

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Mapping[str, torch.Tensor],
                     backends: LayerBackends) -> "CausalLM":
        with torch.device("meta"):
            model = cls(config)
        model.backends = backends
        model.load_weights(tensors, getattr(torch, config.dtype))
        model.post_load()
        model.eval().requires_grad_(False)
        model.freeze()
        return model

    def freeze(self) -> None:
        """For inference from here on: every submodule and parameter becomes a plain instance attribute too.
        nn.Module finds them through its __getattr__, ~0.4 us a lookup; a decode step of a 30-layer model
        makes ~1,000 of them. Afterwards nothing may delete, register, or set to None a parameter or submodule
        (assigning a new Parameter or Module is fine: nn.Module.__setattr__ drops the stale copy)."""
        for module in self.modules():
            vars(module).update(module._modules)
            vars(module).update(module._parameters)

    def post_load(self) -> None:
        """Rearranges loaded weights for speed; parity tests cover the result: fuses projections
        (fuse_projections), then packs 4-bit weights into the kernel's layout and binds the MoE and MLA backends.
        Models with routed experts keep their 4-bit weights on bf16 activations (see Int4Weight.packed)."""
        self.fuse_projections()
        dtype = getattr(torch, self.config.dtype)
        routed = any(isinstance(module, Experts) for module in self.modules())
        for module in self.modules():
            if isinstance(module, Linear):
                if routed and isinstance(module.quantized, Int4Weight):
                    module.keep_file_layout = True
                module.finalize(dtype)
            elif isinstance(module, Experts):
                module.backend = self.backends.moe
            elif isinstance(module, MultiLatentAttention):
                module.backend = self.backends.mla

    @classmethod
    def kv_cache_spec(cls, config: ModelConfig) -> KVCacheSpec:
        """What the paged KV cache must hold per token; models with another layout (MLA) override it."""
        c = config
        num_kv_heads = c.num_key_value_heads // tp_group().size  # each tensor-parallel rank caches its own heads
        return KVCacheSpec(c.num_hidden_layers, num_kv_heads, c.head_dim, c.head_dim)

    def fuse_projections(self) -> None:
        """After loading: one qkv matmul instead of three, gate and up as one. The default is the decoder's
        (`self.model.layers`, each with a self_attn and an mlp that fuse themselves, as Llama's and Gemma 3's); a
        model laid out otherwise overrides it."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def tied_parameters(self) -> dict[str, str]:
        """{parameter name: the name it shares storage with}: by default a tied lm_head (the config's
        tie_word_embeddings) reads the token embedding."""
        if self.config.tie_word_embeddings and "lm_head" in self._modules:
            return {"lm_head.weight": "model.embed_tokens.weight"}
        return {}

    def load_weights(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        tied = self.tied_parameters()
        half = getattr(torch, self.config.weight_dtype) if self.config.weight_dtype else None
        for name, param in list(self.named_parameters()):
            if name in tied:
                continue
            if name not in tensors:
                raise ValueError(f"the checkpoint is missing tensor {name!r}")
            module_name, _, attr = name.rpartition(".")
            shard = getattr(self.get_submodule(module_name), "tp_shards", {}).get(attr)
            tensor = tensors[name] if shard is None else load_shard(tensors, name, shard)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)} but the config implies {tuple(param.shape)}"
                )
            if isinstance(tensor, QuantizedWeight):
                self._set_quantized(name, tensor, dtype)
            elif half is not None and self._kept_half(name):
                self._set_parameter(name, tensor.to(half))
            else:
                self._set_parameter(name, tensor.to(dtype))
        for name, source in tied.items():
            source_module = self.get_submodule(source.rpartition(".")[0])
            if source_module.weight is None:  # a quantized embedding: the lm_head multiplies by it as it is
                self.get_submodule(name.rpartition(".")[0]).set_quantized(source_module.quantized)
            else:
                self._set_parameter(name, self.get_parameter(source))
        for module in self.modules():  # 16-bit tables kept under float32 compute: lookups widen their rows
            if isinstance(module, Embedding) and module.weight is not None and module.weight.dtype != dtype:
                module.lookup_dtype = dtype

    def _kept_half(self, name: str) -> bool:
        """Whether parameter `name` stays in config.weight_dtype under float32 compute: the weights of Linear layers
        (which multiply them as they are: layers/linear.py) and of the token embedding (whose lookups widen the rows
        they take), but not those other code reads as tensors (routed experts, MLA's absorbed kv_b_proj)."""
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name)
        if attr != "weight" or not isinstance(module, (Linear, Embedding)):
            return False
        parts = module_name.split(".")
        return not any(isinstance(self.get_submodule(".".join(parts[:i])), (Experts, MultiLatentAttention))
                       for i in range(1, len(parts)))

    def _set_quantized(self, name: str, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name)
        kept = isinstance(module, Linear) or (isinstance(module, Embedding) and isinstance(weight, BlockWeight))
        if attr == "weight" and kept and self.backends.quant.keeps(weight, dtype):
            if isinstance(module, Embedding):
                module.set_quantized(weight, dtype)
            else:
                module.set_quantized(weight)
        else:  # the kernels multiply bfloat16 activations by Linear weights (and look up block-quantized embeddings) only
            self._set_parameter(name, weight.dequantize(dtype))

    def _set_parameter(self, name: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.get_submodule(module_name)
        module._parameters[attr] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [T] -> hidden states [T, hidden_size] (final norm applied). inputs_embeds [T, hidden]: the
        input embeddings to use instead of the tokens' (images' rows written over placeholders')."""
        return self.model.norm(self.hidden_states(input_ids, meta, inputs_embeds))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> the decoder's input embeddings [T, hidden_size]."""
        return self.model.embed_tokens(input_ids)

    def hidden_states(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [T] -> the last layer's outputs [T, hidden_size], before the final norm (what DeepSeek-V3's
        multi-token-prediction layer reads). The decoder-only default: `self.model` has embed_tokens, layers
        (each called as layer(x, meta, rope)) and norm; `self.rope`."""
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds  # [T, hidden]
        stack = self.decode_stack
        if stack is not None and stack.applies(x, meta):  # a decode step: every layer in one kernel call
            return stack(x, meta)
        rope = self.rope_for(meta)
        for layer in self.model.layers:
            x = layer(x, meta, rope)
        return x

    def rope_for(self, meta: AttentionMetadata):
        """The rotary embedding this step's layers rotate by: `self.rope`, unless the model's positions depend on
        the step (Qwen2.5-VL's M-RoPE)."""
        return self.rope

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden_size] -> logits [N, vocab_size]."""
        return self.lm_head(hidden)


class RenamedTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors seen under the model's parameter names: `candidates(name)` lists where a checkpoint
    may keep a parameter (e.g. `language_model.model.X` in older multimodal checkpoints, `model.language_model.X` in
    newer ones); the first one present is read. Nothing is copied."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], candidates) -> None:
        self.tensors, self.candidates = tensors, candidates

    def _stored(self, name: str) -> str | None:
        return next((c for c in self.candidates(name) if c in self.tensors), None)

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self._stored(name)
        if stored is None:
            raise KeyError(name)
        return self.tensors[stored]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._stored(name) is not None

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)
