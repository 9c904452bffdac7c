"""Builds a `tokenizers.Tokenizer` from a GGUF file's `tokenizer.*` metadata.

A GGUF carries no tokenizer.json: llama.cpp's converter stores the vocabulary (`tokenizer.ggml.tokens`),
per-token types, BPE merges or SentencePiece scores and the special-token ids as metadata. This module
turns those back into a Hugging Face `tokenizers` backend that encodes text to the same ids llama.cpp
does, and wraps it in ownllm's `Tokenizer`.

Two vocabulary kinds are supported (`tokenizer.ggml.model`):

* ``gpt2``  -- byte-level BPE (Llama 3, Qwen2/3, SmolLM2, ...). The pre-tokenizer (how text is split
  before the merges run) is not stored, only named by `tokenizer.ggml.pre`; `_BYTE_LEVEL_PRES` maps
  each name to the split regex llama.cpp's `llm_tokenizer_bpe` (src/llama-vocab.cpp) uses for it.
* ``llama`` -- SentencePiece BPE with byte fallback (Llama 2, Mistral v0.1/0.2, TinyLlama). The file has
  scores but no merges; merges are derived from the vocabulary by score, the way transformers'
  `generate_merges` does for GGUF files. The "▁" prefix is added by a normalizer, as in the legacy HF
  Llama tokenizer.json, because that is what llama.cpp and sentencepiece do (see `_sentencepiece_backend`).

Tokens typed CONTROL (and UNKNOWN) become special added tokens, USER_DEFINED ones plain added tokens,
so both are matched whole in the text like llama.cpp's `tokenizer_st_partition` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer as BackendTokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

if TYPE_CHECKING:
    from ownllm.tokenizer import Tokenizer

# llama.cpp's token types (gguf.TokenType / llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")

# --- byte-level (gpt2) pre-tokenizers -------------------------------------------------------------
# The regexes are the originals from the models' tokenizer.json files; llama.cpp's copies in
# llm_tokenizer_bpe's constructor are the same with (?i:...) spelled out as '[sS]' etc.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's fallback for a missing or "default" pre-tokenizer: four regexes applied one after another.
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")


@dataclass(frozen=True)
class _PreTokenizerSpec:
    splits: tuple[str, ...]  # regexes applied in order, each splitting the pieces of the one before
    ignore_merges: bool = False  # a piece that is itself a vocab token is taken whole (llama3 family)
    add_bos: bool = False  # llama.cpp's default for add_bos when the file does not say


_LLAMA3 = _PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_LLAMA3_MERGING = _PreTokenizerSpec((_LLAMA3_SPLIT,))
_QWEN2 = _PreTokenizerSpec((_QWEN2_SPLIT,))
_SMOLLM = _PreTokenizerSpec((r"\p{N}", _GPT2_SPLIT))  # every digit on its own, then GPT-2's split
_GPT2 = _PreTokenizerSpec((_GPT2_SPLIT,))
_TEKKEN = _PreTokenizerSpec((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True)
_GPT4O = _PreTokenizerSpec((_GPT4O_SPLIT,))
_DEFAULT = _PreTokenizerSpec(_DEFAULT_SPLITS)

# `tokenizer.ggml.pre` -> split; grouped exactly as llama_vocab::impl::load and llm_tokenizer_bpe group them.
_BYTE_LEVEL_PRES: dict[str, _PreTokenizerSpec] = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _LLAMA3,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _LLAMA3_MERGING),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"), _QWEN2
    ),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"), _SMOLLM
    ),
    **dict.fromkeys(
        ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
         "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"),
        _GPT2,
    ),
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "default": _DEFAULT,
}


@dataclass(frozen=True)
class GGUFVocab:
    """The `tokenizer.*` metadata of one GGUF file, typed and defaulted the way llama.cpp reads it."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None
    eom_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | dict[str, str] | None  # a dict when the file also has named templates (tool_use...)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "GGUFVocab":
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
        if model not in SUPPORTED_TOKENIZER_MODELS:
            raise ValueError(
                f"GGUF tokenizer model {model!r} is not supported; supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)}"
            )
        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise ValueError("GGUF file has no vocabulary (tokenizer.ggml.tokens is missing or empty)")
        types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        if len(types) < len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        scores = meta.get("tokenizer.ggml.scores")
        merges = meta.get("tokenizer.ggml.merges")
        pre = meta.get("tokenizer.ggml.pre") or None
        is_spm = model == "llama"
        if model == "gpt2" and not merges:
            raise ValueError("GGUF gpt2 tokenizer has no merges (tokenizer.ggml.merges)")
        if is_spm and (scores is None or len(scores) < len(tokens)):
            raise ValueError("GGUF llama (SentencePiece) tokenizer needs tokenizer.ggml.scores for every token")

        def token_id(key: str, default: int | None) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}", default)
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        # llama.cpp's defaults: SentencePiece vocabularies have <unk>=0, <s>=1, </s>=2 and add BOS.
        pre_spec = _pre_tokenizer_spec(pre) if model == "gpt2" else None
        add_bos_default = True if is_spm else pre_spec.add_bos
        return cls(
            model=model,
            pre=pre,
            tokens=tokens,
            token_types=[int(t) for t in types[: len(tokens)]],
            scores=[float(s) for s in scores] if scores is not None else None,
            merges=list(merges) if merges else None,
            bos_id=token_id("bos_token_id", 1 if is_spm else None),
            eos_id=token_id("eos_token_id", 2 if is_spm else None),
            unk_id=token_id("unknown_token_id", 0 if is_spm else None),
            pad_id=token_id("padding_token_id", None),
            eot_id=token_id("eot_token_id", None),
            eom_id=token_id("eom_token_id", None),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", is_spm)),
            chat_template=_chat_template(meta),
        )

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def _chat_template(meta: Mapping[str, Any]) -> str | dict[str, str] | None:
    """`tokenizer.chat_template`, plus the named ones llama.cpp stores as `tokenizer.chat_template.<name>`
    (as a dict with the main one under "default", the way tokenizer_config.json lists several)."""
    default = meta.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix) and isinstance(v, str)}
    if not named:
        return default
    return {**({"default": default} if default is not None else {}), **named}


def _pre_tokenizer_spec(pre: str | None) -> _PreTokenizerSpec:
    if pre is None:
        return _DEFAULT
    if pre not in _BYTE_LEVEL_PRES:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(sorted(_BYTE_LEVEL_PRES))}"
        )
    return _BYTE_LEVEL_PRES[pre]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = _bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_CHARS.values())
_ADDED_TYPES = (CONTROL, USER_DEFINED, UNKNOWN)


def _split_merge(merge: str) -> tuple[str, str]:
    # llama.cpp splits at the first space after position 0 (a merge's left part may itself be " ").
    pos = merge.find(" ", 1)
    if pos < 0:
        raise ValueError(f"malformed BPE merge {merge!r} in tokenizer.ggml.merges")
    return merge[:pos], merge[pos + 1 :]


def _split_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    """_split_merge of each; at the first space when no merge starts with one or lacks a part (the usual case,
    the same split, 5x faster)."""
    pairs = [merge.partition(" ")[::2] for merge in merges]
    if all(left and right for left, right in pairs):
        return pairs
    return [_split_merge(merge) for merge in merges]


def _byte_level_vocab(vocab: GGUFVocab) -> dict[str, int]:
    """token -> id. Added (control/user-defined) tokens keep their raw text, as llama.cpp stores them;
    a normal token outside the byte alphabet (a converter mislabel) is respelled in it."""
    normal = "".join(token for token, kind in zip(vocab.tokens, vocab.token_types) if kind not in _ADDED_TYPES)
    if set(normal) <= _BYTE_ALPHABET:  # the usual case, nothing to respell: unless a token repeats, every id as is
        ids = dict(zip(vocab.tokens, range(len(vocab.tokens))))
        if len(ids) == len(vocab.tokens):
            return ids
    out: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind not in _ADDED_TYPES and not set(token) <= _BYTE_ALPHABET:
            token = "".join(_BYTE_CHARS[b] for b in token.encode("utf-8"))
        out.setdefault(token, i)
    return out


def _byte_level_pre_tokenizer(spec: _PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    if spec.splits == (_GPT2_SPLIT,):  # GPT-2's own split is built into ByteLevel
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in spec.splits]
    return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_backend(vocab: GGUFVocab) -> BackendTokenizer:
    spec = _pre_tokenizer_spec(vocab.pre)
    merges = _split_merges(vocab.merges or ())
    model = models.BPE(vocab=_byte_level_vocab(vocab), merges=merges, ignore_merges=spec.ignore_merges)
    tok = BackendTokenizer(model)
    tok.pre_tokenizer = _byte_level_pre_tokenizer(spec)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best
    score first (SentencePiece merges the pair whose result scores highest). Same order as transformers'
    `generate_merges`; control, byte and unused pieces take no part."""
    kinds = zip(vocab.tokens, vocab.token_types)
    normal = {token: i for i, (token, kind) in enumerate(kinds) if kind in (NORMAL, USER_DEFINED)}
    scores = vocab.scores or []
    candidates: list[tuple[str, str, float]] = []
    for token, i in normal.items():
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in normal and token[k:] in normal]
        local.sort(key=lambda pair: (normal[pair[0]], normal[pair[1]]))
        candidates.extend((left, right, scores[i]) for left, right in local)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _sentencepiece_backend(vocab: GGUFVocab) -> BackendTokenizer:
    ids = {}
    for i, token in enumerate(vocab.tokens):
        ids.setdefault(token, i)
    model = models.BPE(
        vocab=ids,
        merges=_sentencepiece_merges(vocab),
        unk_token=vocab.token(vocab.unk_id),
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = BackendTokenizer(model)
    # llama.cpp (llama_vocab::impl::tokenize, SPM case) puts a space before every text fragment that
    # starts the input or follows a special token, then escapes ' ' as '▁'. A normalizer runs once per
    # fragment between added tokens, so Prepend + Replace does exactly that (Metaspace's "first" scheme
    # would skip the prefix after special tokens and before text that already starts with a space).
    escape = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), escape]) if vocab.add_space_prefix else escape
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_special_tokens(tok: BackendTokenizer, vocab: GGUFVocab) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens; each
    keeps its id because its text is already in the model's vocabulary."""
    added = _added_ids(vocab)
    special = [vocab.tokens[i] for i in added if vocab.token_types[i] in (CONTROL, UNKNOWN)]
    user = [vocab.tokens[i] for i in added if vocab.token_types[i] == USER_DEFINED]
    if special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _added_ids(vocab: GGUFVocab) -> list[int]:
    """The ids of the tokens that become added tokens (control, unknown, user-defined), in order."""
    return [i for i, kind in enumerate(vocab.token_types) if kind in _ADDED_TYPES]


def _post_processor(vocab: GGUFVocab) -> processors.PostProcessor | None:
    """Prepends BOS / appends EOS on encode(add_special_tokens=True), as llama.cpp's add_bos/add_eos do."""
    bos = vocab.token(vocab.bos_id) if vocab.add_bos else None
    eos = vocab.token(vocab.eos_id) if vocab.add_eos else None
    if bos is None and eos is None:
        return None
    head, tail = ([f"{bos}:0"] if bos else []), ([f"{eos}:0"] if eos else [])
    pair_head, pair_tail = ([f"{bos}:1"] if bos else []), ([f"{eos}:1"] if eos else [])
    specials = [(t, i) for t, i in ((bos, vocab.bos_id), (eos, vocab.eos_id)) if t is not None]
    return processors.TemplateProcessing(
        single=[*head, "$A:0", *tail],
        pair=[*head, "$A:0", *tail, *pair_head, "$B:1", *pair_tail],
        special_tokens=list(dict.fromkeys(specials)),
    )


def build_backend(vocab: GGUFVocab) -> BackendTokenizer:
    """The `tokenizers.Tokenizer` for this vocabulary."""
    tok = _byte_level_backend(vocab) if vocab.model == "gpt2" else _sentencepiece_backend(vocab)
    _add_special_tokens(tok, vocab)
    _check_ids(tok, vocab)
    post = _post_processor(vocab)
    if post is not None:
        tok.post_processor = post
    return tok


def _check_ids(tok: BackendTokenizer, vocab: GGUFVocab) -> None:
    """Every added token must have kept the id the file gives it (tokenizers would silently append a
    token whose text is missing from the model's vocabulary at a new id)."""
    for i in _added_ids(vocab):
        token = vocab.tokens[i]
        if tok.token_to_id(token) != i:
            raise ValueError(
                f"GGUF tokenizer: token {token!r} is id {i} in the file but {tok.token_to_id(token)} when rebuilt "
                "(duplicate entries in tokenizer.ggml.tokens?)"
            )


def eos_token_ids(vocab: GGUFVocab) -> list[int]:
    """Ids that end generation: EOS, then the end-of-turn / end-of-message ids when the file names them."""
    ids = [i for i in (vocab.eos_id, vocab.eot_id, vocab.eom_id) if i is not None]
    return list(dict.fromkeys(ids))


def special_tokens(vocab: GGUFVocab) -> dict[str, str]:
    named = {"bos_token": vocab.bos_id, "eos_token": vocab.eos_id, "unk_token": vocab.unk_id, "pad_token": vocab.pad_id}
    return {name: vocab.tokens[i] for name, i in named.items() if i is not None}


def tokenizer_from_metadata(meta: Mapping[str, Any]) -> "Tokenizer":
    """ownllm's Tokenizer for a GGUF file, given all of its metadata (arrays included)."""
    from ownllm.tokenizer import Tokenizer  # lazy: keeps this module importable on its own

    vocab = GGUFVocab.from_metadata(meta)
    return Tokenizer(
        build_backend(vocab),
        chat_template=vocab.chat_template,
        bos_token=vocab.token(vocab.bos_id),
        eos_token=vocab.token(vocab.eos_id),
        eos_token_ids=eos_token_ids(vocab),
        special_tokens=special_tokens(vocab),
    )


def backend_from_metadata(meta: Mapping[str, Any]) -> BackendTokenizer:
    """Just the `tokenizers.Tokenizer` (for tools and tests that do not need ownllm's wrapper)."""
    return build_backend(GGUFVocab.from_metadata(meta))


__all__: Sequence[str] = (
    "GGUFVocab",
    "backend_from_metadata",
    "build_backend",
    "eos_token_ids",
    "special_tokens",
    "tokenizer_from_metadata",
)
