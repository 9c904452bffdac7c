"""Text <-> token ids for ownllm.

This module owns everything between strings and token ids:

* `Tokenizer`: wraps a Rust `tokenizers.Tokenizer` loaded from an HF checkpoint folder (`from_dir` reads
  tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json and config.json), with
  encode/decode, the stop (eos) token ids, and chat-template rendering that matches transformers'
  `apply_chat_template(tokenize=False)` byte for byte (same sandboxed jinja2 environment, globals, filters and
  input clean-up; the environment is in chat_template.py, imported on the first render).
* `IncrementalDetokenizer`: streaming decode, one token at a time, O(1) per token (vLLM's prefix/read-offset
  window), never emitting half a UTF-8 character.
* `find_stop` / `held_back_len`: stop strings that may span token boundaries while streaming.

transformers is deliberately not imported here; it is only used by the tests as the reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

# The named special tokens transformers passes into chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class MissingTokenizerFile(FileNotFoundError, ValueError):
    """A checkpoint folder has no tokenizer.json (catchable as FileNotFoundError or ValueError)."""


class Tokenizer:
    def __init__(
        self,
        backend: _Backend,
        *,
        chat_template: str | dict[str, str] | None,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: list[int],
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        """`chat_template` may also be a dict of named templates ("default", "tool_use", ...) as in
        tokenizer_config.json; `special_tokens` holds further named tokens (pad_token, unk_token, ...) that the
        chat template sees next to bos_token and eos_token."""
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id: int | None = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_ids: list[int] = list(eos_token_ids)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        named = {"bos_token": bos_token, "eos_token": eos_token, **(special_tokens or {})}
        # transformers' special_tokens_map: only the tokens that are set.
        self.special_tokens_map: dict[str, str] = {k: v for k, v in named.items() if v is not None}

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise MissingTokenizerFile(
                f"{tokenizer_file} not found: ownllm needs the fast-tokenizer file tokenizer.json in the checkpoint "
                "folder (slow sentencepiece/tiktoken-only tokenizers are not supported)"
            )
        # As in transformers 5, tokenizer.json's post-processor alone decides what encode(add_special_tokens=True)
        # adds; tokenizer_config.json's add_bos_token/add_eos_token are ignored.
        backend = _Backend.from_file(str(tokenizer_file))
        backend.no_padding()  # as in transformers, the file's padding and truncation settings are not applied
        backend.no_truncation()
        config = _read_json(path / "tokenizer_config.json")
        tokens = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        extra = config.get("extra_special_tokens")
        if isinstance(extra, Mapping):  # named model-specific tokens, e.g. {"image_token": "<image>"}
            tokens.update({name: _token_content(value) for name, value in extra.items()})
        bos, eos = tokens.pop("bos_token"), tokens.pop("eos_token")

        eos_ids: list[int] = []
        model_config = _read_json(path / "config.json")
        for source in (
            _read_json(path / "generation_config.json").get("eos_token_id"),
            model_config.get("eos_token_id", (model_config.get("text_config") or {}).get("eos_token_id")),
            backend.token_to_id(eos) if eos is not None else None,
        ):
            for token_id in source if isinstance(source, list) else [source]:
                if token_id is not None and token_id not in eos_ids:
                    eos_ids.append(int(token_id))

        return cls(
            backend,
            chat_template=_load_chat_template(path, config),
            bos_token=bos,
            eos_token=eos,
            eos_token_ids=eos_ids,
            special_tokens={k: v for k, v in tokens.items() if v is not None},
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt string, exactly as transformers'
        `apply_chat_template(messages, tools=tools, add_generation_prompt=..., tokenize=False, **template_kwargs)`.
        Template errors (including the template's own `raise_exception`) surface as ValueError."""
        template = self._select_template(tools)
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
            raise TypeError("tools must be JSON-schema dicts")
        # As transformers: drop None-valued keys (OpenAI clients send content=None, tool_calls=None), rebuild
        # everything the sandbox sees out of plain JSON types, and copy reasoning under the names templates read.
        chat = _plain([{k: v for k, v in dict(m).items() if v is not None} for m in messages])
        chat = [_alias_reasoning(m) for m in chat]
        context = _plain({**self.special_tokens_map, **template_kwargs})
        context.setdefault("documents", None)
        from ownllm.chat_template import TemplateError, compile_template  # jinja2 (~20 ms) only when a chat comes

        try:
            return compile_template(template).render(
                messages=chat, tools=_plain(tools), add_generation_prompt=add_generation_prompt, **context
            )
        except TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e

    def encode_chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Render then encode without adding special tokens: the template already writes BOS where it wants one."""
        text = self.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.backend, skip_special_tokens=skip_special_tokens)

    def _select_template(self, tools: list[dict] | None) -> str:
        template = self.chat_template
        if isinstance(template, Mapping):  # named templates: transformers' get_chat_template()
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ValueError(f"This model has several chat templates and no 'default': {sorted(template)}")
        if template is None:
            raise ValueError("This model has no chat template (no chat_template in tokenizer_config.json and no "
                             "chat_template.jinja); cannot apply a chat template")
        return template


class IncrementalDetokenizer:
    """Streaming decode. `push(id)` returns only the text that this token completes.

    vLLM's technique: keep a window `token_ids[prefix_offset:]`; `prefix_offset:read_offset` is the context whose
    text was already emitted. Decode the window with and without the new tokens and emit the difference, unless the
    result ends in U+FFFD (a UTF-8 character split across tokens, byte-level or <0xNN> byte-fallback), in which case
    hold it until a later token completes it. Decoding a window rather than the single token keeps context-dependent
    decoders right (SentencePiece's leading-space handling, byte fusion), and its small size makes each push O(1).
    """

    def __init__(self, backend: _Backend, skip_special_tokens: bool = True) -> None:
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._chunks: list[str] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(token_ids[prefix_offset:read_offset])

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is still held back (e.g. a byte sequence the model never completed) as decode() would."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window_text = self._decode(self.token_ids[self._prefix_offset:])
        if len(window_text) <= len(self._prefix_text) or (window_text.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        new_text = window_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        self._chunks.append(new_text)
        return new_text

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)


def find_stop(text: str, stops: Sequence[str], start: int) -> int:
    """Index in `text` of the earliest stop string that ends at or after `start` (i.e. was completed by text
    appended at `start`), or -1. Each stop is searched from max(0, start - len(stop) + 1), so a stop spanning the
    old/new boundary is found and one lying wholly before `start` is not found again."""
    best = -1
    for stop in stops:
        if not stop:
            continue
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def held_back_len(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` are a proper prefix of some stop string: a streamer must hold them
    back, since the next tokens may complete the stop (which is then not part of the output)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(text), len(stop) - 1), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint-folder helpers


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts {"content": ...}."""
    if isinstance(token, Mapping):
        return token.get("content")
    return token if isinstance(token, str) else None


def _load_chat_template(path: Path, config: dict) -> str | dict[str, str] | None:
    """As transformers: chat_template.jinja (and additional_chat_templates/*.jinja) win over tokenizer_config.json's
    chat_template, which is a string or a list of {"name", "template"}."""
    templates: dict[str, str] = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return template


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: Any) -> Any:
    """Templates read reasoning as `reasoning_content` (gpt-oss: `thinking`); fill both from whichever is set."""
    if not isinstance(message, dict):
        return message
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, so the sandbox never sees objects with unknown methods
    (transformers' _plain_template_data). Anything else becomes an inert "<TypeName>" placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # str/int/float subclasses (enums, numpy scalars) lose their extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalar, e.g. np.bool_
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"
