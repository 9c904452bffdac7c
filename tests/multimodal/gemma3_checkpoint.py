"""A tiny random Gemma3ForConditionalGeneration saved by transformers: a 2-layer SigLIP tower on 32x32 images in 4x4
patches (8x8 = 64 patches, average-pooled to 16 image tokens), a 3-layer Gemma 3 decoder (local, global, local; a
sliding window of 8), `<image_soft_token>`, `<start_of_image>` and `<end_of_image>` special tokens of its tokenizer,
and Gemma3ImageProcessor's preprocessor_config.json. Parameters transformers initializes to zeros (the projection,
Gemma's norms, biases) get random values, so that each of them matters."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.checkpoints import BASE, TINY_VOCAB, save_tiny_tokenizer

IMAGE_TOKEN_ID, BOI_TOKEN_ID, EOI_TOKEN_ID = TINY_VOCAB, TINY_VOCAB + 1, TINY_VOCAB + 2
IMAGE_SIZE, TOKENS_PER_IMAGE = 32, 16
TEXT = dict(BASE, vocab_size=TINY_VOCAB + 8, head_dim=32, num_hidden_layers=3, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_local_base_freq=100.0,
            query_pre_attn_scalar=24, tie_word_embeddings=True)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE,
              patch_size=4, vision_use_head=False)


def preprocessor():
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_gemma3(folder: Path, seed: int = 0, text: dict | None = None, f16_exact: tuple[str, ...] = ()):
    """-> the transformers Gemma3ForConditionalGeneration, float32, eval mode. text: text config overrides;
    f16_exact: suffixes of parameters made exact in float16 (those an mmproj file stores so)."""
    import transformers
    from tokenizers import Tokenizer

    config = transformers.Gemma3Config(
        text_config={**TEXT, **(text or {})}, vision_config=VISION, mm_tokens_per_image=TOKENS_PER_IMAGE, image_token_index=IMAGE_TOKEN_ID,
        boi_token_index=BOI_TOKEN_ID, eoi_token_index=EOI_TOKEN_ID)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval().to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.any():
                param.normal_(0.0, 0.2)
            if f16_exact and name.endswith(f16_exact):
                param.copy_(param.half().float())
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    save_tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<image_soft_token>", "<start_of_image>", "<end_of_image>"])
    assert tok.token_to_id("<image_soft_token>") == IMAGE_TOKEN_ID and tok.token_to_id("<end_of_image>") == EOI_TOKEN_ID
    tok.save(str(folder / "tokenizer.json"))
    preprocessor().save_pretrained(folder)
    return model


def hf_pixel_values(images) -> torch.Tensor:
    """transformers' own preprocessing of the images -> [N, 3, 32, 32]."""
    return preprocessor()(images, return_tensors="pt")["pixel_values"]
