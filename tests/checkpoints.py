"""Tiny random-weight checkpoints saved by transformers in the real on-disk format, for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_VOCAB = 384
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def main():\n    print('hello, world')\n    return 42\n",
    "Numbers 0123456789 and symbols !@#$%^&*()[]{} <>",
    "Ollama, llama.cpp and vLLM run open-weight models locally.",
]

BASE = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    initializer_range=0.1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def save_tiny_tokenizer(folder: Path) -> None:
    """A byte-level BPE trained on a few lines; enough for the loader, while tests feed token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}",
    }))


# architectures whose config class is not named after them (Gemma3Config is the multimodal one)
_CONFIG_CLASSES = {"Gemma3ForCausalLM": "Gemma3TextConfig"}


def build_checkpoint(folder: Path, arch: str, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Saves a random transformers model of `arch` (e.g. "LlamaForCausalLM") -> the HF model, in float32.
    Norm weights that transformers initializes to zeros (Gemma's, which scale by 1 + weight) get random values, so
    a test sees whether the +1 is applied."""
    import transformers

    config_cls = getattr(transformers, _CONFIG_CLASSES.get(arch) or arch.replace("ForCausalLM", "Config"))
    model_cls = getattr(transformers, arch)
    config = config_cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval().to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and not param.any():
                param.normal_(0.0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    save_tiny_tokenizer(folder)
    return model


BERT_BASE = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=512, type_vocab_size=2, initializer_range=0.1,
)
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_tiny_wordpiece_tokenizer(folder: Path) -> None:
    """A BERT-style WordPiece tokenizer (lower-casing, [CLS] text [SEP]) trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=TINY_VOCAB, special_tokens=BERT_SPECIAL_TOKENS)
    tok.train_from_iterator(_CORPUS, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.save(str(folder / "tokenizer.json"))
    names = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), BERT_SPECIAL_TOKENS))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **names}))


def build_bert_checkpoint(folder: Path, pooling: tuple[str, ...] | None = ("mean",), normalize: bool = True,
                          max_seq_length: int = 256, seed: int = 0, **overrides):
    """Saves a random transformers BertModel as a sentence-transformers folder (modules.json, 1_Pooling, and
    sentence_bert_config.json; pooling None: a plain transformers folder without them) -> the HF model, in float32."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**{**BERT_BASE, **overrides})).eval().to(torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    save_tiny_wordpiece_tokenizer(folder)
    if pooling is None:
        return model
    kind = "sentence_transformers.models."
    modules = [{"idx": 0, "name": "0", "path": "", "type": kind + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": kind + "Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": kind + "Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    switches = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
                "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "lasttoken": "pooling_mode_lasttoken"}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": model.config.hidden_size, **{v: k in pooling for k, v in switches.items()}}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return model


def random_prompts(lengths=(5, 17, 40), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in lengths]


def assert_same_generations(outputs, expected, atol: float) -> None:
    """Two runs' CompletionOutputs: the same tokens, and each step's expected top logprobs within atol."""
    for out, ref in zip(outputs, expected, strict=True):
        assert out.token_ids == ref.token_ids
        for step, ref_step in zip(out.logprobs, ref.logprobs):
            for token_id, entry in ref_step.items():
                assert abs(step[token_id].logprob - entry.logprob) < atol


def teacher_forced(llm, prompt: list[int], reference) -> list[tuple[dict[int, float], int, float]]:
    """Along a reference run's greedy CompletionOutput (logprobs >= 1): after each prefix of its tokens, (our
    top-20 logprobs {token: logprob}, the reference's next token, the reference's logprob of it)."""
    from ownllm import SamplingParams

    prefixes = [prompt + reference.token_ids[:i] for i in range(len(reference.token_ids))]
    outputs = llm.generate(prefixes, SamplingParams(temperature=0, max_tokens=1, logprobs=20))
    return [({t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}, token, expected[token].logprob)
            for out, token, expected in zip(outputs, reference.token_ids, reference.logprobs)]


def assert_tracks_reference(llm, prompt: list[int], reference, atol: float) -> list[float]:
    """Teacher-forced along a reference run (see teacher_forced) made with min_tokens = max_tokens: our logprob
    of each of its tokens is within atol of its own, and that token is our argmax (EOS aside) or within 2 atol
    of it (a near-tie for the reference, where two runs rounding differently may part: each of the two
    logprobs may move by atol). -> those logprob differences, one per step."""
    held_back = set(llm.tokenizer.eos_token_ids)  # the reference runs with min_tokens, so EOS is never its choice
    differences = []
    for step, (ours, token, expected) in enumerate(teacher_forced(llm, prompt, reference)):
        assert token in ours, f"step {step}: the reference's token {token} is outside our top 20"
        differences.append(abs(ours[token] - expected))
        assert differences[-1] < atol, f"step {step}: logprob {ours[token]:.4f} vs {expected:.4f}"
        gap = max(v for t, v in ours.items() if t not in held_back) - ours[token]
        assert gap < 2 * atol, f"step {step}: token {token} is {gap:.3f} below our best, no near-tie"
    return differences


def llama_cpp_forced_differences(path, prompts: list[list[int]], references) -> list[float]:
    """llama.cpp (float32 activations, rounded to 8 bits for each quantized matmul as its CPU kernels do) on the
    GGUF at path, teacher-forced along reference runs (CompletionOutputs with logprobs, one per prompt): at each
    step |llama.cpp's logprob of the reference's token - the reference's|."""
    import numpy as np
    import pytest

    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    differences = []
    for prompt, reference in zip(prompts, references, strict=True):
        tokens = prompt + reference.token_ids
        model.reset()
        model.eval(tokens)
        logprobs = torch.tensor(np.array(model.scores[: len(tokens)]), dtype=torch.float64).log_softmax(-1)
        differences += [abs(logprobs[len(prompt) + i - 1, token].item() - reference.logprobs[i][token].logprob)
                        for i, token in enumerate(reference.token_ids)]
    return differences


def activation_moves(path, prompts: list[list[int]], references, monkeypatch) -> tuple[list[float], list[float]]:
    """How far a bfloat16 load of the GGUF at path is moved from float32 reference runs by each of two roundings,
    teacher-forced (differences as assert_tracks_reference takes them, steps where the reference's token left
    the top 20 left out): bf16 activations alone (the same load with the integer kernels off), and 8-bit
    activations alone, which llama.cpp measures (its CPU kernels round float32 activations to 8 bits, as ours
    round bf16 ones). -> (bf16's differences, llama.cpp's)."""
    import ownllm.layers.quant as quant
    from ownllm import LLM

    with monkeypatch.context() as patch:
        patch.setattr(quant, "VNNI_MAX_ROWS", {})
        bf16 = LLM(str(path), dtype="bfloat16")
        bf16_moves = [abs(ours[token] - expected) for prompt, reference in zip(prompts, references, strict=True)
                      for ours, token, expected in teacher_forced(bf16, prompt, reference) if token in ours]
    return bf16_moves, llama_cpp_forced_differences(path, prompts, references)


def eight_bit_bounds(path, prompts: list[list[int]], references, monkeypatch) -> tuple[float, float]:
    """What 8-bit activations (the integer kernels, at prefill and decode) on top of bf16 ones may move a bfloat16
    load from float32 references: the two roundings' moves (activation_moves) added, since their errors add at
    most. -> (bound on the mean difference, on any one step's)."""
    bf16, eight_bit = activation_moves(path, prompts, references, monkeypatch)
    return sum(bf16) / len(bf16) + sum(eight_bit) / len(eight_bit), max(bf16) + max(eight_bit)


@torch.inference_mode()
def assert_matches_reference(token_ids: list[int], logprobs: list[dict], reference, k: int = 5,
                             atol: float = 1e-3) -> None:
    """Our greedy tokens equal transformers' (hf_greedy's (tokens, per-step logprobs)), and its top-k logprobs at
    each step are among ours, within atol."""
    ref_tokens, ref_logprobs = reference
    assert token_ids == ref_tokens
    for step, (entry, ref) in enumerate(zip(logprobs, ref_logprobs)):
        values, ids = ref.topk(k)
        for token_id, value in zip(ids.tolist(), values.tolist()):
            assert token_id in entry, f"step {step}: top-{k} token {token_id} missing"
            assert abs(entry[token_id].logprob - value) < atol, f"step {step}, token {token_id}"


def hf_greedy(model, prompt: list[int], max_new_tokens: int, **inputs) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation -> (new token ids, per step logprobs [vocab]). inputs: more model inputs
    (e.g. pixel_values)."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0, **inputs,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [step[0].float().log_softmax(-1) for step in out.logits]


def build_thinking_checkpoint(folder: Path) -> None:
    """A tiny random Qwen3 with Qwen3's chat template, its generation prompt opening the think block as
    Qwen3-Thinking-2507's does, and <think>, </think>, <|im_start|>, <|im_end|> as single tokens."""
    from tokenizers import AddedToken, Tokenizer

    build_checkpoint(folder, "Qwen3ForCausalLM", vocab_size=TINY_VOCAB + 8)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok.save(str(folder / "tokenizer.json"))
    template = (Path(__file__).parent / "data" / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8")
    opening = "{{- '<|im_start|>assistant\\n' }}"
    assert template.count(opening) == 1
    template = template.replace(opening, "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}))
