"""ownllm.tokenizer: loading a checkpoint folder, encode/decode, streaming detokenization, stop strings.

Two real tokenizers are trained offline with `tokenizers` (milliseconds): a byte-level BPE (GPT-2 /
Llama 3 / Qwen style) and a SentencePiece-style BPE with byte fallback (Llama 2 style: Metaspace, <0x00>..<0xFF>
byte tokens, decoders Replace+ByteFallback+Fuse+Strip) whose vocabulary lacks most CJK and all emoji.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ownllm.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop, held_back_len


def transformers_5():
    """The reference implementation; ownllm follows transformers 5 (special tokens, chat-template inputs)."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("ownllm follows transformers 5 semantics")
    return transformers


SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<pad>"]
LLAMA2_LIKE = "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"
SYLLABLES = ["ka", "to", "ri", "mon", "sel", "qu", "ent", "ion", "ar", "pre", "ly", "ing", "th", "é", "ü", "日", "語"]
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BYTE_LEVEL_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! How are you doing today?",
    "Café, naïve, résumé, façade, déjà vu. Ünïcödé çà et là. Straße, smørrebrød.",
    "日本語のテキストです。東京は大きい都市です。中文文本测试，你好世界。",
    "Emoji: 😀😃😄 🎉🎉 👍 ❤️ party time 🎉",
    "def f(x):\n    return x * 2  # code\n\tindented with a tab\n",
] * 5 + [  # pseudo-words, so that training reaches the full vocabulary
    " ".join("".join(random.Random(i * 31 + j).choices(SYLLABLES, k=1 + j % 4)) for j in range(40))
    for i in range(60)
]
SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! How are you doing today?",
    "Cafe, naive, resume, facade, deja vu. Numbers 12345 and symbols #$%&*()[]{}.",
    "Café déjà vu: a few accents é è à. 中文",
] * 5
STREAM_TEXTS = [
    "Hello, world! Plain ASCII text with numbers 42 and symbols #@!.",
    "Café naïve résumé — déjà vu, Ünïcödé.",
    "日本語と中文、混合テキスト。東京 你好",
    "Family: 👩‍👩‍👧 and flags 🇯🇵🇫🇷 done",
    "Thumbs 👍🏽 heart ❤️ sparkle ✨ 🎉",
    "Rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠜎𠜱 ﷽ end",
    "Two  spaces\nnew line\ttab, trailing  ",
]


def byte_level_backend() -> Backend:
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(BYTE_LEVEL_CORPUS, trainer)
    return tok


def sentencepiece_style_backend() -> Backend:
    """Llama-2-like: ids 0-2 <unk> <s> </s>, 3-258 the byte tokens <0x00>..<0xFF>, then learned pieces."""
    learner = Backend(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    learner.train_from_iterator(SP_CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


def write_checkpoint(path: Path, backend: Backend, tokenizer_config: dict, generation_config: dict | None = None,
                     config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config), encoding="utf-8")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory) -> Path:
    backend = byte_level_backend()
    ids = {t: backend.token_to_id(t) for t in SPECIALS}
    # No post-processor in tokenizer.json (as Qwen's), so encode() adds nothing whatever add_bos_token says.
    return write_checkpoint(
        tmp_path_factory.mktemp("byte_level"), backend,
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": added_token("<s>"), "eos_token": "<|im_end|>",
         "pad_token": "<pad>", "add_bos_token": True, "chat_template": CHATML},
        generation_config={"eos_token_id": [ids["<|im_end|>"], ids["</s>"]]},
        config={"eos_token_id": ids["<|endoftext|>"], "bos_token_id": ids["<s>"]},
    )


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory) -> Path:
    return write_checkpoint(
        tmp_path_factory.mktemp("sentencepiece"), sentencepiece_style_backend(),
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": added_token("</s>"),
         "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": LLAMA2_LIKE},
        generation_config={"eos_token_id": 2}, config={"eos_token_id": 2},
    )


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tok(request) -> Tokenizer:
    return Tokenizer.from_dir(request.getfixturevalue(f"{request.param}_dir"))


# ------------------------------------------------------------------------------------------------- loading


def test_from_dir_reads_special_tokens_and_eos_union(byte_level_dir):
    tok = Tokenizer.from_dir(byte_level_dir)
    ids = {t: tok.backend.token_to_id(t) for t in SPECIALS}
    assert tok.bos_token_id == ids["<s>"]
    # generation_config's list, then config.json's int, then tokenizer_config's eos (already present): no duplicates
    assert tok.eos_token_ids == [ids["<|im_end|>"], ids["</s>"], ids["<|endoftext|>"]]
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True) == 1000
    assert tok.special_tokens_map == {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>"}


def test_eos_ids_from_each_file(tmp_path):
    backend = byte_level_backend()
    ids = {t: backend.token_to_id(t) for t in SPECIALS}
    only_tokenizer = write_checkpoint(tmp_path / "a", backend, {"eos_token": added_token("<|im_end|>")})
    assert Tokenizer.from_dir(only_tokenizer).eos_token_ids == [ids["<|im_end|>"]]
    all_three = write_checkpoint(tmp_path / "b", backend, {"eos_token": "<|endoftext|>"},
                                 generation_config={"eos_token_id": ids["</s>"]},
                                 config={"eos_token_id": [ids["<|im_end|>"], ids["</s>"]]})
    assert Tokenizer.from_dir(all_three).eos_token_ids == [ids["</s>"], ids["<|im_end|>"], ids["<|endoftext|>"]]
    nested = write_checkpoint(tmp_path / "c", backend, {}, config={"text_config": {"eos_token_id": ids["</s>"]}})
    assert Tokenizer.from_dir(nested).eos_token_ids == [ids["</s>"]]


def test_from_dir_without_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path / "does-not-exist")


def test_chat_template_sources(tmp_path):
    backend = byte_level_backend()
    named = write_checkpoint(tmp_path / "named", backend, {"chat_template": [
        {"name": "default", "template": "default:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"},
    ]})
    tok = Tokenizer.from_dir(named)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "default:hi"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[{"a": 1}]) == "tools:1"

    # newer transformers save the template as chat_template.jinja, which wins over tokenizer_config.json
    jinja_file = write_checkpoint(tmp_path / "file", backend, {"chat_template": "from config"})
    (jinja_file / "chat_template.jinja").write_text("from file {{ messages | length }}\n", encoding="utf-8")
    assert Tokenizer.from_dir(jinja_file).apply_chat_template([{"role": "user", "content": "x"}]) == "from file 1"

    without = write_checkpoint(tmp_path / "none", backend, {})
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(without).apply_chat_template([{"role": "user", "content": "x"}])


def test_special_tokens_come_from_the_tokenizer_json_post_processor(byte_level_dir, sentencepiece_dir):
    # Both configs say add_bos_token: true; as in transformers 5, only tokenizer.json's post-processor counts.
    sp = Tokenizer.from_dir(sentencepiece_dir)
    ids = sp.encode("Hello world")
    assert ids[0] == sp.bos_token_id == 1 and 1 not in ids[1:]
    assert sp.encode("Hello world", add_special_tokens=False) == ids[1:]
    byte_level = Tokenizer.from_dir(byte_level_dir)  # no post-processor
    assert byte_level.encode("Hello world") == byte_level.encode("Hello world", add_special_tokens=False)
    assert byte_level.bos_token_id not in byte_level.encode("Hello world")


# ------------------------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    with_specials = [tok.bos_token_id, *ids, tok.eos_token_ids[0]]
    assert tok.decode(with_specials) == text
    assert tok.decode(with_specials, skip_special_tokens=False).startswith("<s>")


def test_sentencepiece_style_falls_back_to_bytes(sentencepiece_dir):
    tok = Tokenizer.from_dir(sentencepiece_dir)
    ids = tok.encode("😀", add_special_tokens=False)
    pieces = [tok.backend.id_to_token(i) for i in ids]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_encode_chat_has_a_single_bos(byte_level_dir, sentencepiece_dir):
    messages = [{"role": "user", "content": "Hello 👋"}]
    chatml = Tokenizer.from_dir(byte_level_dir)
    text = chatml.apply_chat_template(messages)
    assert text == "<s><|im_start|>user\nHello 👋<|im_end|>\n<|im_start|>assistant\n"
    ids = chatml.encode_chat(messages)
    assert ids == chatml.encode(text, add_special_tokens=False)
    assert ids[:2] == [chatml.bos_token_id, chatml.backend.token_to_id("<|im_start|>")]

    llama2 = Tokenizer.from_dir(sentencepiece_dir)  # its post-processor adds <s>, and so does its template
    text = llama2.apply_chat_template(messages)
    assert text == "<s>[INST] Hello 👋 [/INST]"
    ids = llama2.encode_chat(messages)
    assert ids.count(llama2.bos_token_id) == 1 and ids[0] == llama2.bos_token_id
    assert llama2.encode(text).count(llama2.bos_token_id) == 2  # what encode_chat avoids


# -------------------------------------------------------------------------------------------- streaming


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens=skip_special_tokens)
    chunks = [detok.push(i) for i in ids]
    assert detok.token_ids == ids
    assert detok.text == "".join(chunks)
    return chunks


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streaming_matches_decode_and_never_splits_a_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    if not text.isascii():
        # the multi-byte characters really were split across tokens, and held back until complete
        assert "" in chunks


@pytest.mark.parametrize("skip", [True, False])
def test_streaming_with_special_tokens(tok, skip):
    im_end = tok.backend.token_to_id("</s>")
    ids = tok.encode("Hello 東京") + [im_end] + tok.encode(" world 🎉", add_special_tokens=False) + [im_end]
    chunks = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
    assert ("</s>" in "".join(chunks)) is not skip


def test_streaming_text_that_does_not_round_trip(tok):
    # SentencePiece-style tokenizers lose one leading space (Metaspace does not prepend "▁" to text that already
    # starts with a space, and the decoder strips one): streaming must still agree with decode().
    ids = tok.encode("  leading spaces", add_special_tokens=False)
    assert "".join(stream(tok, ids)) == tok.decode(ids) in ("  leading spaces", " leading spaces")


def test_first_token_held_back_when_it_is_a_partial_character(tok):
    ids = tok.encode("𠜎!", add_special_tokens=False)  # a 4-byte character in neither vocabulary
    assert len(ids) >= 3
    detok = tok.detokenizer()
    assert detok.push(ids[0]) == ""
    assert detok.text == ""
    assert "".join(detok.push(i) for i in ids[1:]) == "𠜎!"
    assert detok.flush() == ""


def test_streaming_random_byte_level_ids_matches_decode(byte_level_dir):
    """Arbitrary (mostly invalid UTF-8) token sequences: pushes plus the final flush still equal decode()."""
    tok = Tokenizer.from_dir(byte_level_dir)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(SPECIALS), tok.vocab_size) for _ in range(60)]
        detok = tok.detokenizer()
        text = "".join(detok.push(i) for i in ids) + detok.flush()
        assert text == tok.decode(ids) == detok.text


class CountingBackend:
    """Records how many ids each decode() call gets."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.sizes = backend, []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def test_streaming_cost_per_token_is_constant(tok):
    text = " ".join(STREAM_TEXTS) * 10
    ids = tok.encode(text, add_special_tokens=False)
    counting = CountingBackend(tok.backend)
    detok = IncrementalDetokenizer(counting)
    assert "".join(detok.push(i) for i in ids) == text
    assert len(ids) > 500 and max(counting.sizes) <= 12  # a small window, not the whole history
    assert len(counting.sizes) <= 2 * len(ids)


# ------------------------------------------------------------------------------------------- stop strings


def test_stop_string_split_across_tokens():
    stops = ["###"]
    text = "Answer: 42 #"
    assert find_stop(text, stops, 0) == -1
    assert held_back_len(text, stops) == 1  # "#" might start "###": hold it back
    start, text = len(text), text + "##"  # the next token brings "##"
    assert find_stop(text, stops, start) == len("Answer: 42 ")
    assert text[: find_stop(text, stops, start)] == "Answer: 42 "


def test_find_stop_earliest_wins():
    text = "foo END bar STOP baz"
    assert find_stop(text, ["STOP", "END"], 0) == 4
    assert find_stop(text, ["STOP", "END"], 12) == 12
    assert find_stop(text, ["", "baz"], 0) == 17  # empty stops are ignored
    assert find_stop(text, [], 0) == -1


def test_find_stop_only_reports_newly_completed_stops():
    text = "ab### then more"
    assert find_stop(text, ["###"], 4) == 2  # ends at index 4: completed by text from index 4 on
    assert find_stop(text, ["###"], 5) == -1  # ended before start: already handled earlier
    assert find_stop(text, ["###", "more"], 5) == text.index("more")


def test_held_back_len():
    stops = ["<|end|>", "\n\n"]
    assert held_back_len("foo", stops) == 0
    assert held_back_len("foo\n", stops) == 1
    assert held_back_len("foo<|e", stops) == 3
    assert held_back_len("foo<|end|", stops) == 6
    assert held_back_len("<|", ["<|end|>", "|"]) == 2
    assert held_back_len("x", []) == 0
    assert held_back_len("", stops) == 0


# ------------------------------------------------------------------------------- against transformers itself


@pytest.mark.parametrize("folder", ["byte_level_dir", "sentencepiece_dir"])
def test_matches_transformers(folder, request):
    transformers = transformers_5()
    path = request.getfixturevalue(folder)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    tok = Tokenizer.from_dir(path)
    assert tok.vocab_size == len(hf)
    assert tok.bos_token_id == hf.bos_token_id
    assert hf.eos_token_id in tok.eos_token_ids
    for text in STREAM_TEXTS:
        for add in (True, False):
            ids = tok.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add)
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    if hf.chat_template is not None:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🎉"}]
        assert tok.encode_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                   tokenize=True, return_dict=False)
