"""A real LLaVA config.json (llava-hf/llava-1.5-7b-hf's, which leaves transformers' defaults out of text_config and
vision_config) reads as the model it is."""

from __future__ import annotations

from PIL import Image

from ownllm.config import ModelConfig
from ownllm.multimodal.llava import LlavaImageProcessor

LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "vision_config": {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
        "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_llava_15_config_fills_transformers_defaults():
    config = ModelConfig.from_hf(LLAVA_15_7B)
    assert (config.architecture, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == \
        ("LlavaForConditionalGeneration", 4096, 11008, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size, config.max_position_embeddings) \
        == (32, 32, 32064, 4096)
    assert config.rms_norm_eps == 1e-5 and config.dtype == "float16"
    processor = LlavaImageProcessor.from_checkpoint(config, {}, None)
    assert processor.image_token_id == 32000
    assert processor.num_image_tokens(processor.preprocess(Image.new("RGB", (500, 400)))) == 576
