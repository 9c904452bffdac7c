"""Qwen2ForCausalLM: the Llama decoder with biases on q, k and v (never on o_proj)."""

from ownllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_bias = False
