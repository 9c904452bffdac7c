"""Test helper: writes GGUF files the way llama.cpp's convert_hf_to_gguf.py does, for tiny models.

`write_gguf(source, path, qtype)` converts a transformers Llama/Mistral/Qwen2/Qwen3 model (or a folder
saved with save_pretrained + a tokenizer.json) into a GGUF: the `{arch}.*` metadata of
`TextModel.set_gguf_parameters` (+ LlamaModel's vocab_size / rope.dimension_count; Gemma3Model's sliding
window), the Q/K row permutation of `LlamaModel.modify_tensors` for llama-architecture models, Gemma 3's norm
names and the 1 Gemma3Model.modify_tensors adds to its norm weights, 1-D tensors and norms in F32,
the other weights as F32/F16/BF16/Q8_0 via `gguf.quants.quantize`, the llama3 `rope_freqs` tensor of
`generate_extra_tensors`, and a byte-level BPE (`gpt2`) tokenizer section like `_set_vocab_gpt2`.

Also here: a tiny byte-level BPE tokenizer trained on an inline corpus, a tiny SentencePiece model,
writers for vocab-only files and for files with raw (already quantized) tensor bytes, and llama.cpp's
quantizer for the K-quant files gguf-py cannot write.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as QType

ARCH_OF = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
FILE_TYPE_OF = {
    QType.F32: gguf.LlamaFileType.ALL_F32,
    QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GEMMA3_LAYER_NAMES = {  # where gemma3 differs from HF_TO_GGUF_LAYER
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# --- tiny tokenizers ------------------------------------------------------------------------------

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "Hello world, hello there. It's a test: we're testing what they'll say, and I've said it.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 345))  # 357\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 12345 3.14159 2024-01-01",
    "   leading spaces and    runs   of spaces\n\n\nand newlines\r\n",
    "日本語のテキストです。中文文本。한국어 텍스트.",
    "Emoji: 🦙🚀😀 👍🏽 ✅",
    "Ünïcödé àccents: café, naïve, Straße, Ελληνικά, русский текст.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED_TOKENS = ["<think>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_OF_PRE = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}


def tiny_byte_level_tokenizer(pre: str = "llama-bpe", vocab_size: int = 400):
    """A byte-level BPE trained on CORPUS with the split regex of `pre` (llama-bpe or qwen2), the
    SPECIAL_TOKENS as ids 0.. and USER_DEFINED_TOKENS appended as plain added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_OF_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    if pre == "llama-bpe":  # Llama 3's tokenizer.json sets ignore_merges, and llama.cpp follows it
        tok.model.ignore_merges = True
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in USER_DEFINED_TOKENS])
    return tok


def tiny_sentencepiece_model(directory: str | os.PathLike, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE model with byte fallback (Llama 2 style: <unk>=0, <s>=1, </s>=2), trained on CORPUS."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(line for text in CORPUS * 3 for line in text.splitlines() if line.strip()), "utf-8")
    prefix = directory / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=USER_DEFINED_TOKENS,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


# --- tokenizer metadata ---------------------------------------------------------------------------


def add_byte_level_vocab(
    writer: gguf.GGUFWriter,
    tokenizer,
    vocab_size: int,
    *,
    pre: str,
    bos_token_id: int | None,
    eos_token_id: int | None,
    pad_token_id: int | None = None,
    add_bos: bool | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
) -> None:
    """tokenizer.ggml.* for a byte-level BPE `tokenizers.Tokenizer`, as _set_vocab_gpt2 / get_vocab_base
    write it: every id up to vocab_size (missing ones as [PAD{i}], UNUSED), added tokens by their text,
    typed CONTROL when special and USER_DEFINED otherwise."""
    data = json.loads(tokenizer.to_str())
    added = {t["id"]: t for t in data["added_tokens"]}
    reverse = {i: t for t, i in data["model"]["vocab"].items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _add_special_ids(writer, bos_token_id, eos_token_id, pad_token_id, add_bos, chat_template)


def add_sentencepiece_vocab(
    writer: gguf.GGUFWriter,
    model_file: str | os.PathLike,
    *,
    add_bos: bool | None = True,
    chat_template: str | None = None,
) -> None:
    """tokenizer.ggml.* for a SentencePiece model, as _create_vocab_sentencepiece writes it."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif piece in USER_DEFINED_TOKENS:
            kind = gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(piece)
        scores.append(sp.get_score(i))
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special_ids(writer, sp.bos_id(), sp.eos_id(), None, add_bos, chat_template)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_space_prefix(True)


def _add_special_ids(writer, bos, eos, pad, add_bos, chat_template) -> None:
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if chat_template:
        writer.add_chat_template(chat_template)


# --- model metadata and tensors --------------------------------------------------------------------


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF rotate_half rows -> llama.cpp interleaved rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    halves = weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
    return halves.swapaxes(1, 2).reshape(weights.shape)


def _rope(config: Mapping[str, Any]) -> tuple[float, dict]:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))  # Gemma 3 keys them by layer type
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), params


def llama3_rope_factors(config: Mapping[str, Any], head_dim: int) -> np.ndarray:
    """LlamaModel.generate_extra_tensors: the rope_freqs tensor of a llama3-scaled model."""
    theta, params = _rope(config)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def add_model_metadata(writer: gguf.GGUFWriter, config: Mapping[str, Any], arch: str, qtype: QType) -> None:
    """TextModel.set_gguf_parameters (+ LlamaModel.set_gguf_parameters for llama)."""
    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    theta, params = _rope(config)
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(params["factor"])
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(params["factor"])
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(FILE_TYPE_OF[qtype])
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    if hf_name in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    names = {**HF_TO_GGUF_LAYER, **GEMMA3_LAYER_NAMES} if arch == "gemma3" else HF_TO_GGUF_LAYER
    return f"blk.{layer}.{names[rest]}"


def convert_tensor(name: str, data: np.ndarray, qtype: QType) -> tuple[np.ndarray, QType]:
    """The prepare_tensors rule: 1-D tensors and norms in F32, the rest in qtype (F16 when a row does
    not fit the quant block)."""
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = QType.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, QType.F16), QType.F16


def add_model_tensors(
    writer, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], arch: str, qtype: QType
) -> None:
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    _, params = _rope(config)
    if params.get("rope_type") == "llama3":
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config, head_dim), raw_dtype=QType.F32)
    for hf_name, value in state_dict.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # transformers keeps a tied alias in the state dict; the converter writes no output.weight
        data = value.detach().to(torch.float32).numpy()
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute(data, heads, heads)
        if arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute(data, heads, kv_heads)
        name = gguf_tensor_name(hf_name, arch)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0
        data, kind = convert_tensor(name, data, qtype)
        writer.add_tensor(name, data, raw_dtype=kind)


def _load_source(source) -> tuple[dict, dict[str, torch.Tensor], Any]:
    """(config dict, state dict, tokenizers.Tokenizer or None) from a model or a save_pretrained folder."""
    if isinstance(source, (str, os.PathLike)):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(source)
        config = json.loads((folder / "config.json").read_text())
        state: dict[str, torch.Tensor] = {}
        for file in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(file)))
        tok_file = folder / "tokenizer.json"
        return config, state, Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else None
    return source.config.to_dict(), dict(source.state_dict()), None


def write_gguf(
    source,
    path: str | os.PathLike,
    qtype: str | QType = "F32",
    *,
    tokenizer=None,
    pre: str = "llama-bpe",
    add_bos: bool | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    name: str = "tiny",
    architecture: str | None = None,
    extra_tensors: Iterable[tuple[str, np.ndarray, QType]] = (),
) -> Path:
    """Convert a tiny HF causal LM (model object, or folder with config.json/*.safetensors/tokenizer.json)
    to a GGUF at `path` with weights in `qtype` (F32, F16, BF16 or Q8_0). For error tests,
    `architecture` overrides the general.architecture written and `extra_tensors` adds raw tensors."""
    qtype = QType[qtype] if isinstance(qtype, str) else qtype
    config, state, folder_tokenizer = _load_source(source)
    tokenizer = tokenizer or folder_tokenizer
    arch = ARCH_OF[(config.get("architectures") or ["LlamaForCausalLM"])[0]]
    path = Path(path)
    writer = gguf.GGUFWriter(path, architecture or arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_model_metadata(writer, config, arch, qtype)
    if tokenizer is not None:
        add_byte_level_vocab(
            writer,
            tokenizer,
            config["vocab_size"],
            pre=pre,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            add_bos=add_bos,
            chat_template=chat_template,
        )
    add_model_tensors(writer, config, state, arch, qtype)
    for tensor_name, data, kind in extra_tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _finish(writer)
    return path


def random_quant_blocks(kind: QType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for `rows` x `cols` values of a quantized type, with small finite fp16 scales (and mins):
    [rows, cols / block * block bytes] uint8, as GGUF lays them out (any such bytes are valid blocks)."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    n = rows * cols // block
    data = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    offsets = {  # where each block keeps its fp16 scale (and min)
        QType.Q4_0: (0,), QType.Q8_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q5_1: (0, 2),
        QType.Q2_K: (80, 82), QType.Q3_K: (108,), QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,),
    }
    for offset in offsets[kind]:
        data[:, offset : offset + 2] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    return data.reshape(rows, cols // block * size)


def quantize_with_llama_cpp(source: str | os.PathLike, path: str | os.PathLike, ftype: str) -> Path:
    """llama.cpp's own quantizer (llama-quantize, through llama-cpp-python) on an F32/F16 GGUF: `ftype` is a
    llama_ftype name such as "Q4_K_M" (Q4_K with Q6_K for some tensors, as users download them)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {ftype}")
    return Path(path)


def write_vocab_only(path: str | os.PathLike, add_vocab, architecture: str = "llama") -> Path:
    """A GGUF with only metadata: `add_vocab(writer)` adds the tokenizer section."""
    writer = gguf.GGUFWriter(Path(path), architecture)
    writer.add_name("vocab-only")
    add_vocab(writer)
    _finish(writer)
    return Path(path)


def write_raw_tensors(
    path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray, QType]], architecture: str = "llama"
) -> Path:
    """A GGUF holding the given tensors as raw bytes ([rows, bytes per row] uint8 for quantized types)."""
    writer = gguf.GGUFWriter(Path(path), architecture)
    for name, data, kind in tensors:
        writer.add_tensor(name, data, raw_dtype=kind)
    _finish(writer)
    return Path(path)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
