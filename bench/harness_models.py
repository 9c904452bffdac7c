"""The comparison harness's models: random-weight checkpoints of real shapes, built once and cached.

`MODELS` names what the harness runs. `build(name)` makes (or finds, under bench/.cache/) a model's HF
folder (transformers LlamaConfig + LlamaForCausalLM, random init, bf16 safetensors, with a byte-level
BPE tokenizer.json padded to the model's vocab size) and its F16 and Q8_0 GGUFs, written by
tests/gguf_writer.py; both also as Q4_K_M (the most downloaded kind of GGUF: Q4_K with some Q6_K, and for
SmolLM2's rows of 576 mostly Q5_0), written by llama.cpp's own quantizer from the F16 file. The bundled SmolLM2-135M-Instruct Q4_1 GGUF is
used as it is.
`weight_bytes_per_token` tells how many bytes of weights one batch-1 decode step reads.

Run as `python bench/harness_models.py NAME` to build one model in a process of its own (the harness
does this, so the 1B's ~2.5 GB of bf16 weights and the GGUF writer's copies are freed on exit).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
BUILD_VERSION = 1  # bump to rebuild cached checkpoints when the recipe below changes

LLAMA_3_2_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192),
)
SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=100000.0),
)
SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "smollm2-135m": SMOLLM2_135M}


@dataclass(frozen=True)
class Model:
    """One row group of the table: a model file (HF folder or .gguf) and how it is stored."""

    name: str  # e.g. "llama-3.2-1b"
    weights: str  # "bf16" (HF folder), "F16" / "Q8_0" (GGUF we wrote), "Q4_K_M" (llama.cpp's), "Q4_1" (bundled GGUF)
    shape: str  # key of SHAPES, or "bundled"

    @property
    def is_gguf(self) -> bool:
        return self.weights != "bf16"

    @property
    def label(self) -> str:
        return f"{self.name} {self.weights}"

    def path(self) -> Path:
        if self.shape == "bundled":
            from ownllm.loader.resolve import bundled_model_path

            return bundled_model_path()
        folder = CACHE / f"{self.shape}-v{BUILD_VERSION}"
        return folder / f"model-{self.weights}.gguf" if self.is_gguf else folder / "hf"


MODELS = [
    Model("smollm2-135m", "bf16", "smollm2-135m"),
    Model("smollm2-135m", "F16", "smollm2-135m"),
    Model("smollm2-135m", "Q8_0", "smollm2-135m"),
    Model("smollm2-135m", "Q4_K_M", "smollm2-135m"),  # rows of 576: llama.cpp falls back to Q5_0 for most
    Model("smollm2-135m-instruct", "Q4_1", "bundled"),
    Model("llama-3.2-1b", "bf16", "llama-3.2-1b"),
    Model("llama-3.2-1b", "F16", "llama-3.2-1b"),
    Model("llama-3.2-1b", "Q8_0", "llama-3.2-1b"),
    Model("llama-3.2-1b", "Q4_K_M", "llama-3.2-1b"),
]


def ensure_built(shape: str, hf_only: bool = False) -> None:
    """Builds the cached checkpoints of `shape` in a child process unless they are all there (hf_only: just
    the HF folder, e.g. on a GPU machine without llama-cpp-python)."""
    if shape == "bundled":
        return
    wanted = [m.path() for m in MODELS if m.shape == shape and not (hf_only and m.is_gguf)]
    if all(p.exists() for p in wanted):
        return
    print(f"[harness] building {shape} checkpoints under {CACHE} (once; cached for later runs)", flush=True)
    subprocess.run([sys.executable, __file__, shape, *(["--hf-only"] if hf_only else [])], check=True, cwd=ROOT)


def build(shape: str, hf_only: bool = False) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.gguf_writer import quantize_with_llama_cpp, write_gguf

    folder = CACHE / f"{shape}-v{BUILD_VERSION}"
    hf = folder / "hf"
    if not hf.exists():  # written under another name and renamed, so an interrupted build is redone
        partial = folder / "hf.partial"
        config = LlamaConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=2, initializer_range=0.02,
                             dtype="bfloat16")
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # init directly in bf16: no float32 copy of the 1B
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
        partial.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(partial, safe_serialization=True, max_shard_size="10GB")
        del model
        save_tokenizer(partial, config.vocab_size)
        partial.rename(hf)
    if hf_only:
        return
    for qtype in ("F16", "Q8_0"):
        path = folder / f"model-{qtype}.gguf"
        if not path.exists():
            partial = path.with_suffix(".partial")
            write_gguf(hf, partial, qtype, name=shape)
            partial.rename(path)
    for model in MODELS:
        if model.shape == shape and "_K" in model.weights and not model.path().exists():
            partial = model.path().with_suffix(".partial")
            quantize_with_llama_cpp(folder / "model-F16.gguf", partial, model.weights)
            partial.rename(model.path())


def save_tokenizer(folder: Path, vocab_size: int) -> None:
    """A small trained byte-level BPE (tests/gguf_writer.py's) padded with filler tokens to `vocab_size`
    ids, as ownllm's loader needs a tokenizer.json and the GGUF needs one token per embedding row."""
    from tokenizers import Tokenizer

    sys.path.insert(0, str(ROOT))
    from tests.gguf_writer import tiny_byte_level_tokenizer

    data = json.loads(tiny_byte_level_tokenizer("llama-bpe", vocab_size=512).to_str())
    vocab = data["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in data["added_tokens"]}
    for i in range(vocab_size):
        if i not in used:
            vocab[f"<filler_{i}>"] = i
    text = json.dumps(data, ensure_ascii=False)
    assert Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True) == vocab_size
    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    ))


def weight_bytes_per_token(model: Model, dtype_bytes: float | None = None) -> float:
    """Bytes of weights one batch-1 decode step reads: every matrix once, the lm_head (the tied
    embedding) included, the embedding lookup's single row left out. For a GGUF, the file's own tensor
    sizes; with `dtype_bytes`, the parameter count at that many bytes per weight (a dequantized load)."""
    if model.is_gguf and dtype_bytes is None:
        import gguf

        tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(model.path())).tensors}
        embed = tensors.pop("token_embd.weight")
        return sum(tensors.values()) + (0 if "output.weight" in tensors else embed)
    return num_params_per_token(model) * (dtype_bytes or 2)


def num_params_per_token(model: Model) -> int:
    if model.shape == "bundled":
        shape = SMOLLM2_135M
    else:
        shape = SHAPES[model.shape]
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim, heads, kv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    attn = h * head_dim * (2 * heads + 2 * kv)
    per_layer = attn + 3 * h * inter + 2 * h
    return layers * per_layer + h + shape["vocab_size"] * h


if __name__ == "__main__":
    build(sys.argv[1], hf_only="--hf-only" in sys.argv[2:])
