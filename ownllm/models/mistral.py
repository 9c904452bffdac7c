"""MistralForCausalLM: the Llama decoder; a config `sliding_window` limits every layer's attention span."""

from ownllm.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
