"""A tiny random Llama4ForConditionalGeneration saved by transformers: a 2-layer Llama 4 vision tower on 56x56 tiles in
7x7 patches (8x8 = 64 patches, pixel-shuffled to 16 rows per tile), a 4-layer Llama 4 decoder (MoE on every layer,
4 experts, chunked attention of 16 on the rope layers, layer 3 NoPE), Llama 4's six image tokens as special tokens of
its tokenizer, a chat template writing `<|image|>` for an image part, and Llama4ImageProcessor's
preprocessor_config.json (56x56 tiles, at most 4 of them, so an image is 1 to 4 tiles plus the global one).
Parameters transformers initializes to zeros (biases) get random values."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.checkpoints import BASE, TINY_VOCAB, save_tiny_tokenizer

SPECIAL = ["<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>",
           "<|tile_y_separator|>"]
IMAGE_START_ID, IMAGE_END_ID, IMAGE_ID, PATCH_ID, TILE_X_ID, TILE_Y_ID = range(TINY_VOCAB, TINY_VOCAB + 6)
TILE_SIZE, TOKENS_PER_TILE = 56, 16
PREPROCESSOR = {"size": {"height": TILE_SIZE, "width": TILE_SIZE}, "max_patches": 4}
CHAT_TEMPLATE = (  # Llama 4's renders an image part as <|image|>, as here
    "{% for m in messages %}<s>{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{% if part['type'] == 'image' %}<|image|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
TEXT = dict(BASE, vocab_size=TINY_VOCAB + 8, num_hidden_layers=4, head_dim=16, num_local_experts=4,
            intermediate_size_mlp=96, attention_chunk_size=16, floor_scale=8, attn_scale=0.5,
            interleave_moe_layer_step=1, max_position_embeddings=1024)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              vision_output_dim=48, projector_input_dim=48, projector_output_dim=48, image_size=TILE_SIZE,
              patch_size=7, pixel_shuffle_ratio=0.5, initializer_range=0.1)


def build_llama4(folder: Path, seed: int = 0, vision: dict | None = None, text: dict | None = None,
                 preprocessor: dict | None = None):
    """-> the transformers Llama4ForConditionalGeneration, float32, eval mode. vision, text, preprocessor: overrides
    (the benchmark's larger shapes)."""
    import transformers
    from tokenizers import Tokenizer

    config = transformers.Llama4Config(vision_config={**VISION, **(vision or {})}, text_config={**TEXT, **(text or {})},
                                       image_token_index=PATCH_ID, boi_token_index=IMAGE_START_ID,
                                       eoi_token_index=IMAGE_END_ID)
    torch.manual_seed(seed)
    model = transformers.Llama4ForConditionalGeneration(config).eval()  # float32; .to() would drop the vision
    # rope's complex buffer to its real part
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    save_tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(SPECIAL)
    assert [tok.token_to_id(t) for t in SPECIAL] == list(range(TINY_VOCAB, TINY_VOCAB + 6))
    tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Llama4ImageProcessorFast", "resample": 2, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, **PREPROCESSOR, **(preprocessor or {})}))
    return model
