"""llama.cpp's multimodal projector files (`--mmproj`, general.architecture "clip") -> the vision half of a
multimodal checkpoint: HF-named tensors, the HF config keys of the vision tower and projector, and the image
preprocessing settings. `multimodal_checkpoint` joins them to a text GGUF's config and tensors, so that a text GGUF
plus its mmproj load as the Hugging Face checkpoint they were converted from (newer transformers layout:
`model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.weight`).

Supported projector types (clip.projector_type):
- "mlp": LLaVA 1.5 (llama.cpp's legacy convert_image_encoder_to_gguf.py): a CLIP tower (v.class_embd, v.patch_embd,
  v.position_embd, v.pre_ln, v.blk.N.*), stored only up to the deepest layer LLaVA reads (clip.vision.block_count,
  and clip.vision.feature_layer as non-negative hidden-state indices; without it, the last stored layer), and the
  projector mm.0 -> GELU -> mm.2. That converter names CLIP's fc1 `ffn_down` and fc2 `ffn_up`; as clip.cpp does, the
  pair is swapped back when the shapes say so. llama.cpp always drops the CLS position (the "default" strategy).
- "gemma3": Gemma 3 (convert_hf_to_gguf.py's Gemma3VisionModel): a SigLIP tower (v.patch_embd with bias,
  v.position_embd, v.blk.N.*, v.post_ln), mm.input_projection [vision hidden, text hidden] and mm.soft_emb_norm,
  stored plus 1 (Gemma's norm), which is undone here; the pooled tokens per image are
  (image_size / patch_size / clip.vision.projector.scale_factor (default 4))**2.
Tensors may be F32, F16, BF16 or a quantized type; all are dequantized to float32 (the model casts them).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ownllm.loader.gguf import _f32, dequantize_tensor, open_gguf, read_fields

if TYPE_CHECKING:
    from ownllm.tokenizer import Tokenizer

# clip.projector_type -> the HF architecture the text model becomes
PROJECTORS = {"mlp": "LlavaForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}
# the text GGUF architectures (HF names) each projector goes with
TEXT_ARCHITECTURES = {
    "mlp": ("LlamaForCausalLM", "MistralForCausalLM"),
    "gemma3": ("Gemma3ForCausalLM",),
}

_GLOBAL_NAMES = {
    "v.class_embd": "embeddings.class_embedding",
    "v.patch_embd.weight": "embeddings.patch_embedding.weight",
    "v.patch_embd.bias": "embeddings.patch_embedding.bias",
    "v.position_embd.weight": "embeddings.position_embedding.weight",
    "v.pre_ln.weight": "pre_layrnorm.weight",
    "v.pre_ln.bias": "pre_layrnorm.bias",
    "v.post_ln.weight": "post_layernorm.weight",
    "v.post_ln.bias": "post_layernorm.bias",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2", "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
_PROJECTOR_NAMES = {
    "mlp": {"mm.0.weight": "linear_1.weight", "mm.0.bias": "linear_1.bias", "mm.2.weight": "linear_2.weight",
            "mm.2.bias": "linear_2.bias"},
    "gemma3": {"mm.input_projection.weight": "mm_input_projection_weight",
               "mm.soft_emb_norm.weight": "mm_soft_emb_norm.weight"},
}
# tensors each projector type's tower does not have (llama.cpp would apply them; ownllm's models do not)
_UNSUPPORTED = {"mlp": ("v.post_ln.weight", "v.post_ln.bias"),
                "gemma3": ("v.class_embd", "v.pre_ln.weight", "v.pre_ln.bias")}
_LAYER_RE = re.compile(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass
class VisionProjector:
    projector_type: str  # clip.projector_type
    config: dict  # HF config keys beside text_config: vision_config, vision_feature_layer, mm_tokens_per_image, ...
    tensors: dict[str, torch.Tensor]  # HF names under model.vision_tower. / model.multi_modal_projector.
    preprocessor_config: dict  # preprocessor_config.json-style: image size, mean and std
    projection_dim: int  # the width of the embeddings the projector writes (the text model's hidden size)


def load_mmproj(path: str | os.PathLike) -> VisionProjector:
    """Reads an mmproj GGUF; ValueError naming the file and the problem when it is not one ownllm supports."""
    path = os.fspath(path)
    reader = open_gguf(path)
    fields = read_fields(reader)
    if fields.get("general.architecture") != "clip":
        raise ValueError(f"{path} is not a multimodal projector (mmproj) file: its general.architecture is "
                         f"{fields.get('general.architecture')!r}, expected 'clip'")
    kind = fields.get("clip.projector_type") or fields.get("clip.vision.projector_type")
    if kind not in PROJECTORS:
        raise ValueError(f"{path}: projector type {kind!r} (clip.projector_type) is not supported; supported: "
                         f"{', '.join(PROJECTORS)} (LLaVA and Gemma 3)")
    if fields.get("clip.vision.image_grid_pinpoints"):
        raise ValueError(f"{path}: LLaVA-NeXT (1.6) projectors, which split images into a grid of tiles "
                         "(clip.vision.image_grid_pinpoints), are not supported; LLaVA 1.5's are")
    stored = {t.name: t for t in reader.tensors}
    for name in _UNSUPPORTED[kind]:
        if name in stored:
            raise ValueError(f"{path}: tensor {name!r} is not supported with projector type {kind!r}")
    tensors = {_hf_name(name, kind, path): _value(tensor, kind) for name, tensor in stored.items()}
    vision = _vision_config(fields, kind, tensors)
    if kind == "mlp":
        _unswap_ffn(tensors, vision["hidden_size"])
    config = _llava_config(fields, tensors) if kind == "mlp" else _gemma3_config(fields, vision)
    mean = [float(v) for v in _require(fields, "clip.vision.image_mean", path)]
    std = [float(v) for v in _require(fields, "clip.vision.image_std", path)]
    size = vision["image_size"]
    preprocessing = {"image_mean": mean, "image_std": std}
    if kind == "mlp":  # CLIPImageProcessor: shortest edge, then a center crop
        preprocessing.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:  # Gemma3ImageProcessor: a fixed square
        preprocessing.update(size={"height": size, "width": size})
    # from the projector's output rows, as clip.cpp reads it (the legacy converter's clip.vision.projection_dim is
    # CLIP's own projection, not the text model's width)
    return VisionProjector(kind, {**config, "vision_config": vision}, tensors, preprocessing,
                           _projection_dim(tensors, kind, path))


def multimodal_checkpoint(text_config: dict, text_tensors: dict, projector: VisionProjector,
                          tokenizer: "Tokenizer", model: str, mmproj: str) -> tuple[dict, dict]:
    """A text GGUF's (HF config, HF tensors) and its projector -> the multimodal model's (config, tensors); ValueError
    when they do not belong together."""
    text_arch = text_config["architectures"][0]
    kind = projector.projector_type
    if text_arch not in TEXT_ARCHITECTURES[kind]:
        raise ValueError(f"--mmproj {mmproj} is a {kind!r} projector ({PROJECTORS[kind]}), which does not go with "
                         f"{model}, a {text_arch} text model")
    if projector.projection_dim != text_config["hidden_size"]:
        raise ValueError(f"--mmproj {mmproj} does not fit {model}: the projector writes embeddings of size "
                         f"{projector.projection_dim} but the text model's hidden size is {text_config['hidden_size']}")
    config = {**projector.config, "architectures": [PROJECTORS[kind]], "text_config": text_config,
              **_image_token_ids(kind, tokenizer, text_config)}
    config["model_type"] = "llava" if kind == "mlp" else "gemma3"
    tensors = {("lm_head.weight" if name == "lm_head.weight" else f"model.language_model.{name.removeprefix('model.')}"):
               value for name, value in text_tensors.items()}
    tensors.update(projector.tensors)
    return config, tensors


# --- tensors ---------------------------------------------------------------------------------------------------


def _hf_name(name: str, kind: str, path: str) -> str:
    if name in _PROJECTOR_NAMES[kind]:
        return f"model.multi_modal_projector.{_PROJECTOR_NAMES[kind][name]}"
    if name in _GLOBAL_NAMES:
        return f"model.vision_tower.{_GLOBAL_NAMES[name]}"
    match = _LAYER_RE.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, attr = match.groups()
        return f"model.vision_tower.encoder.layers.{layer}.{_LAYER_NAMES[part]}.{attr}"
    raise ValueError(f"{path}: tensor {name!r} is not one ownllm knows for projector type {kind!r}")


def _value(tensor, kind: str) -> torch.Tensor:
    value = dequantize_tensor(tensor, torch.float32)
    if kind == "gemma3" and tensor.name == "mm.soft_emb_norm.weight":
        value = value - 1.0  # Gemma3VisionModel.modify_tensors stores the norm weight plus 1
    return value


def _unswap_ffn(tensors: dict[str, torch.Tensor], hidden: int) -> None:
    """The legacy converter writes CLIP's fc1 as ffn_down and fc2 as ffn_up; fc1 is [intermediate, hidden]."""
    for name in [n for n in tensors if n.endswith(".mlp.fc2.weight")]:
        fc1, fc2 = name.replace("fc2", "fc1"), name
        if fc1 in tensors and tensors[fc2].shape[1] == hidden and tensors[fc1].shape[0] == hidden:
            for attr in ("weight", "bias"):
                a, b = fc1.replace("weight", attr), fc2.replace("weight", attr)
                if a in tensors and b in tensors:
                    tensors[a], tensors[b] = tensors[b], tensors[a]


def _projection_dim(tensors: dict[str, torch.Tensor], kind: str, path: str) -> int:
    name, gguf_name, axis = (("linear_2.weight", "mm.2.weight", 0) if kind == "mlp" else
                             ("mm_input_projection_weight", "mm.input_projection.weight", 1))
    tensor = tensors.get(f"model.multi_modal_projector.{name}")
    if tensor is None:
        raise ValueError(f"{path}: the projector tensor {gguf_name!r} is missing")
    return int(tensor.shape[axis])


# --- config ----------------------------------------------------------------------------------------------------


def _require(fields: dict[str, Any], key: str, path: str = "the mmproj file") -> Any:
    if key not in fields:
        raise ValueError(f"{path}: GGUF metadata lacks {key}")
    return fields[key]


def _vision_config(fields: dict[str, Any], kind: str, tensors: dict[str, torch.Tensor]) -> dict:
    """transformers' CLIPVisionConfig / SiglipVisionConfig keys from clip.vision.*."""
    patch = tensors.get("model.vision_tower.embeddings.patch_embedding.weight")
    if patch is None:
        raise ValueError("the mmproj file lacks tensor 'v.patch_embd.weight'")
    gelu = bool(fields.get("clip.use_gelu", kind == "gemma3"))
    return {
        "model_type": "clip_vision_model" if kind == "mlp" else "siglip_vision_model",
        "hidden_size": int(_require(fields, "clip.vision.embedding_length")),
        "intermediate_size": int(_require(fields, "clip.vision.feed_forward_length")),
        "num_hidden_layers": int(_require(fields, "clip.vision.block_count")),
        "num_attention_heads": int(_require(fields, "clip.vision.attention.head_count")),
        "layer_norm_eps": _f32(fields.get("clip.vision.attention.layer_norm_epsilon", 1e-5 if kind == "mlp" else 1e-6)),
        "image_size": int(_require(fields, "clip.vision.image_size")),
        "patch_size": int(_require(fields, "clip.vision.patch_size")),
        "num_channels": int(patch.shape[1]),
        "hidden_act": ("gelu" if gelu else "quick_gelu") if kind == "mlp" else "gelu_pytorch_tanh",
    }


def _llava_config(fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict:
    layers = fields.get("clip.vision.feature_layer")
    if isinstance(layers, list):
        layers = [int(i) for i in layers if int(i) >= 0] or -1
    return {
        "vision_feature_layer": layers if layers is not None else -1,  # -1: the last stored layer, as llama.cpp
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": "model.multi_modal_projector.linear_1.bias" in tensors,
    }


def _gemma3_config(fields: dict[str, Any], vision: dict) -> dict:
    scale = int(fields.get("clip.vision.projector.scale_factor") or 4)
    per_side = vision["image_size"] // vision["patch_size"] // scale
    return {"mm_tokens_per_image": per_side * per_side}


# the placeholder tokens, by their text in the vocabulary, with transformers' default ids where a vocabulary lacks them
_IMAGE_TOKENS = {
    "mlp": {"image_token_index": ("<image>", 32000)},
    "gemma3": {"image_token_index": ("<image_soft_token>", 262144), "boi_token_index": ("<start_of_image>", 255999),
               "eoi_token_index": ("<end_of_image>", 256000)},
}


def _image_token_ids(kind: str, tokenizer: "Tokenizer", text_config: dict) -> dict[str, int]:
    """The image tokens' ids in the text GGUF's vocabulary (llama.cpp needs none: it writes embeddings, not tokens).
    One the vocabulary lacks takes transformers' id where the embedding has that row. Gemma 3's GGUFs stop before
    <image_soft_token>; as its rows are only ever overwritten by an image's, `<pad>` stands in for it. Otherwise a
    missing token is a ValueError."""
    ids = {}
    for key, (text, default) in _IMAGE_TOKENS[kind].items():
        token_id = tokenizer.backend.token_to_id(text)
        if token_id is None and default < text_config["vocab_size"]:
            token_id = default
        if token_id is None and kind == "gemma3" and key == "image_token_index":
            token_id = tokenizer.backend.token_to_id("<pad>")
        if token_id is None:
            raise ValueError(f"the text model's vocabulary has no {text} token, which images need")
        ids[key] = int(token_id)
    return ids
