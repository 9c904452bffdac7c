"""Maps a config.json "architectures" name to its model class, importing the model file lazily. The one list of
supported architectures: ModelConfig.from_hf checks a config against it before reading any other field. Imports no
model file (and so no torch) until a class is asked for."""

from __future__ import annotations

import importlib

_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "Llama4ForCausalLM": ("llama4", "Llama4ForCausalLM"),
    "Llama4ForConditionalGeneration": ("llama4", "Llama4ForConditionalGeneration"),
    "DeepseekV3ForCausalLM": ("deepseek_v3", "DeepseekV3ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3ForConditionalGeneration"),
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "BertModel": ("bert", "BertModel"),
}
# encoders that embed text (ownllm.engine.embedder) rather than generate it
_EMBEDDING_ARCHITECTURES = {"BertModel"}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def check_supported(architecture: str) -> None:
    """Raises ValueError naming `architecture` and the supported ones unless it is one of them."""
    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        )


def is_embedding_architecture(architecture: str) -> bool:
    return architecture in _EMBEDDING_ARCHITECTURES


def model_class(architecture: str) -> type:
    check_supported(architecture)
    module, name = _ARCHITECTURES[architecture]
    return getattr(importlib.import_module(f"ownllm.models.{module}"), name)
