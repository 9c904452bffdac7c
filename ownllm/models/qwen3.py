"""Qwen3ForCausalLM: the Llama decoder with per-head RMSNorm on q and k, applied before RoPE."""

from ownllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
