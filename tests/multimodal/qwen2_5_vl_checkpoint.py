"""A tiny random Qwen2_5_VLForConditionalGeneration saved by transformers: a 3-block vision tower (blocks 0 and 2
attend in windows of 2x2 merged patches, block 1 over the whole image) on 4x4-pixel patches merged 2x2, images of
16x16 to 40x40 pixels as the preprocessor resizes them (4 to 25 image tokens); a 2-layer Qwen2 decoder with M-RoPE
(mrope_section [2, 3, 3] of its 8 frequencies); `<|image_pad|>`, `<|vision_start|>`, `<|vision_end|>` special tokens
of its tokenizer, a chat template rendering {"type": "image"} parts as Qwen2.5-VL's does
(`<|vision_start|><|image_pad|><|vision_end|>`) and Qwen2VLImageProcessor's preprocessor_config.json. Parameters
transformers initializes to zeros (biases) get random values, so that each of them matters."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.checkpoints import BASE, TINY_VOCAB, save_tiny_tokenizer

IMAGE_TOKEN_ID, VISION_START_ID, VISION_END_ID, VIDEO_TOKEN_ID = (TINY_VOCAB + i for i in range(4))
TEXT = dict(BASE, vocab_size=TINY_VOCAB + 8, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, spatial_merge_size=2,
              temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1], out_hidden_size=BASE["hidden_size"],
              initializer_range=0.1)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PREPROCESSING = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=40 * 40)


def preprocessor(preprocessing: dict | None = None):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**(PREPROCESSING if preprocessing is None else preprocessing))


def build_qwen2_5_vl(folder: Path, seed: int = 0, vision: dict | None = None, text: dict | None = None,
                     preprocessing: dict | None = None):
    """-> the transformers Qwen2_5_VLForConditionalGeneration, float32, eval mode. vision, text, preprocessing:
    overrides (the benchmark's larger shapes)."""
    import transformers
    from tokenizers import Tokenizer

    config = transformers.Qwen2_5_VLConfig(
        text_config={**TEXT, **(text or {})}, vision_config={**VISION, **(vision or {})}, image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID)
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval().to(torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    save_tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>",
                            "<|im_end|>"])
    assert tok.token_to_id("<|image_pad|>") == IMAGE_TOKEN_ID and tok.token_to_id("<|vision_end|>") == VISION_END_ID
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    preprocessor(None if preprocessing is None else {**PREPROCESSING, **preprocessing}).save_pretrained(folder)
    return model


def hf_image_inputs(images) -> dict[str, torch.Tensor]:
    """transformers' own preprocessing of the images -> pixel_values [patches, 3 * 2 * 4 * 4] and image_grid_thw."""
    out = preprocessor()(images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
