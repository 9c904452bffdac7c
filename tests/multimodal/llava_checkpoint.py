"""A tiny random LLaVA saved by transformers: a 3-layer CLIP tower on 32x32 images in 8x8 patches (16 image tokens
with the "default" strategy), a 2-layer Llama or Mistral decoder, `<image>` a special token of its tokenizer, a
chat template rendering {"type": "image"} parts as `<image>`, and a CLIP preprocessor_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.checkpoints import BASE, TINY_VOCAB, save_tiny_tokenizer

IMAGE_TOKEN_ID = TINY_VOCAB  # the first id past the trained vocabulary
IMAGE_SIZE, PATCH_SIZE = 32, 8
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def build_llava(folder: Path, text_arch: str = "LlamaForCausalLM", seed: int = 0, vision: dict | None = None,
                text: dict | None = None, f16_exact: tuple[str, ...] = (), **llava_overrides):
    """-> the transformers LlavaForConditionalGeneration, float32, eval mode. vision, text: config overrides (the
    benchmark's larger shapes). f16_exact: suffixes of parameters made exact in float16 (those an mmproj file stores
    so)."""
    import transformers
    from tokenizers import Tokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    text_config = getattr(transformers, text_arch.replace("ForCausalLM", "Config"))(
        **{**BASE, "vocab_size": TINY_VOCAB + 8, **(text or {})})
    vision_config = transformers.CLIPVisionConfig(**{
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "projection_dim": 16, "initializer_range": 0.1,
        **(vision or {})})
    config = transformers.LlavaConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                                      image_token_index=IMAGE_TOKEN_ID, **llava_overrides)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval().to(torch.float32)
    _round_to_f16(model, f16_exact)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    save_tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<image>"])
    assert tok.token_to_id("<image>") == IMAGE_TOKEN_ID
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    size = vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=size).save_pretrained(folder)
    return model


def _round_to_f16(model, suffixes: tuple[str, ...]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if suffixes and name.endswith(suffixes):
                param.copy_(param.half().float())


def hf_pixel_values(images) -> torch.Tensor:
    """transformers' own preprocessing of the images -> [N, 3, 32, 32]."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE)
    return processor(images, return_tensors="pt")["pixel_values"]
