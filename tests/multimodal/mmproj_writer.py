"""Test helper: llama.cpp's multimodal projector (mmproj) GGUF files and text GGUFs from tiny transformers vision
models, written the way llama.cpp's converters write them.

- LLaVA ("mlp"): tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py --llava-projector ... --use-f32: the
  CLIP tower cut after the deepest feature layer, its tensors renamed by that script's replace chain (which calls
  fc1 `ffn_down` and fc2 `ffn_up`), post_layernorm dropped, the patch embedding and the projector's matrices in F16
  whatever the flags (so the
  checkpoint builders' f16_exact=LLAVA_F16 makes those weights F16-exact first), the rest F32.
- Gemma 3 ("gemma3"): convert_hf_to_gguf.py --mmproj --outtype f32 (MmprojModel + Gemma3VisionModel): tensor_mapping's
  names, mm.input_projection forced to F16, the embeddings F32, mm.soft_emb_norm stored plus 1, and
  clip.vision.projector.scale_factor when it is not 4.
- The text part: the language model alone, through tests/gguf_writer.write_gguf (F32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QType

from tests.gguf_writer import write_gguf


LLAVA_F16 = ("patch_embedding.weight", "linear_1.weight", "linear_2.weight")
GEMMA3_F16 = ("mm_input_projection_weight",)


def _legacy_clip_name(name: str) -> str:
    """convert_image_encoder_to_gguf.py's get_tensor_name for a CLIPVisionModel tensor (its replace chain)."""
    for old, new in (("text_model", "t"), ("vision_model", "v"), ("encoder.layers", "blk"), ("embeddings.", ""),
                     ("_proj", ""), ("self_attn.", "attn_"), ("layer_norm", "ln"), ("layernorm", "ln"),
                     ("mlp.fc1", "ffn_down"), ("mlp.fc2", "ffn_up"), ("embedding", "embd"), ("final", "post"),
                     ("layrnorm", "ln")):
        name = name.replace(old, new)
    return name


def write_llava_mmproj(hf_model, path: Path, mean=(0.48145466, 0.4578275, 0.40821073),
                       std=(0.26862954, 0.26130258, 0.27577711), **overrides) -> Path:
    """An "mlp" mmproj of a transformers LlavaForConditionalGeneration. overrides: metadata to change (error tests)."""
    config = hf_model.config
    vision = config.vision_config
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    feature_layers = [i if i >= 0 else vision.num_hidden_layers + i + 1 for i in layers]
    writer = gguf.GGUFWriter(path, "clip")
    metadata = {
        "clip.has_text_encoder": False, "clip.has_vision_encoder": True, "clip.has_llava_projector": True,
        "clip.projector_type": "mlp", "clip.vision.image_size": vision.image_size,
        "clip.vision.patch_size": vision.patch_size, "clip.vision.embedding_length": vision.hidden_size,
        "clip.vision.feed_forward_length": vision.intermediate_size,
        "clip.vision.projection_dim": vision.projection_dim,
        "clip.vision.attention.head_count": vision.num_attention_heads,
        "clip.vision.attention.layer_norm_epsilon": vision.layer_norm_eps,
        "clip.vision.block_count": max(feature_layers), "clip.use_gelu": vision.hidden_act == "gelu",
        **overrides,
    }
    writer.add_file_type(0)
    writer.add_name("tiny-llava")
    for key, value in metadata.items():
        _add(writer, key, value)
    writer.add_array("clip.vision.feature_layer", feature_layers)
    writer.add_array("clip.vision.image_mean", list(mean))
    writer.add_array("clip.vision.image_std", list(std))
    projector = hf_model.model.multi_modal_projector.state_dict()
    for name, value in projector.items():  # the projector first, as the script adds it
        data = value.detach().numpy()
        kind = QType.F16 if data.ndim == 2 else QType.F32
        writer.add_tensor(name.replace("linear_1", "mm.0").replace("linear_2", "mm.2"), data.astype(np.float16)
                          if kind == QType.F16 else data.astype(np.float32), raw_dtype=kind)
    tower = _tower(hf_model).state_dict()
    for name, value in tower.items():
        if name.startswith("post_layernorm"):
            continue  # LLaVA's projector never reads it
        if name.startswith("encoder.layers.") and int(name.split(".")[2]) >= max(feature_layers):
            continue  # layers past the deepest feature layer are cut off
        data = value.detach().squeeze().numpy()
        kind = QType.F16 if data.ndim == 4 else QType.F32
        writer.add_tensor(_legacy_clip_name(f"vision_model.{name}"), data.astype(np.float16 if kind == QType.F16
                                                                                  else np.float32), raw_dtype=kind)
    _finish(writer)
    return path


_GEMMA3_TOWER = {
    "embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
    "post_layernorm": "v.post_ln",
}
_GEMMA3_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}


def _gemma3_name(name: str) -> str:
    """tensor_mapping's gguf name for a SiglipVisionModel tensor (without `vision_model.`)."""
    module, _, attr = name.rpartition(".")
    if module in _GEMMA3_TOWER:
        return f"{_GEMMA3_TOWER[module]}.{attr}"
    _, _, layer, part = module.split(".", 3)  # encoder.layers.N.<part>
    return f"v.blk.{layer}.{_GEMMA3_LAYER[part]}.{attr}"


def write_gemma3_mmproj(hf_model, path: Path, projector_type: str = "gemma3") -> Path:
    """A "gemma3" mmproj of a transformers Gemma3ForConditionalGeneration (projector_type: for error tests)."""
    config = hf_model.config
    vision = config.vision_config
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_file_type(0)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(config.text_config.hidden_size)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_block_count(vision.num_hidden_layers)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_clip_projector_type(projector_type)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_use_gelu(True)
    scale = (vision.image_size // vision.patch_size) // int(config.mm_tokens_per_image ** 0.5)
    if scale != 4:
        writer.add_vision_projector_scale_factor(scale)
    for name, value in _tower(hf_model).state_dict().items():
        writer.add_tensor(_gemma3_name(name), value.detach().numpy().astype(np.float32), raw_dtype=QType.F32)
    projector = hf_model.model.multi_modal_projector
    writer.add_tensor("mm.input_projection.weight",
                      projector.mm_input_projection_weight.detach().numpy().astype(np.float16), raw_dtype=QType.F16)
    writer.add_tensor("mm.soft_emb_norm.weight", projector.mm_soft_emb_norm.weight.detach().numpy() + 1.0,
                      raw_dtype=QType.F32)
    _finish(writer)
    return path


def write_text_gguf(hf_model, folder: Path, path: Path, text_arch: str, chat_template: str | None = None) -> Path:
    """The language model of a multimodal transformers model as a text GGUF (F32), with the folder's tokenizer (a
    byte-level BPE split as GPT-2 splits, which llama.cpp calls "gpt-2") and chat_template."""
    import transformers
    from tokenizers import Tokenizer

    text_config = hf_model.config.text_config
    text_config.architectures = [text_arch]
    text_model = getattr(transformers, text_arch)(text_config).eval()
    state = {f"model.{k}": v for k, v in hf_model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = hf_model.lm_head.weight
    text_model.load_state_dict(state, strict=False)
    return write_gguf(text_model, path, tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")), pre="gpt-2",
                      chat_template=chat_template)


def _add(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, list):
        writer.add_array(key, value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, value)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tower(hf_model):
    """The vision transformer (embeddings, encoder, norms) of a transformers multimodal model."""
    tower = hf_model.model.vision_tower
    return getattr(tower, "vision_model", tower)
