"""Tool-call parsers: the model-side text of a tool call -> ToolCall(name, arguments), one small file per format,
registered by name and chosen from the model's chat template (`--tool-call-parser NAME` overrides).

A parser says where calls start (`find_start`, a position in content text, or where a partial match might
still start so the stream holds that text back) and parses the calls out of the text from there
(`take_calls`): a format whose calls close themselves (Hermes' `</tool_call>`) hands each call over as it
completes; one whose calls run to the end of the answer parses them when the answer is final. Arguments are
kept as the model wrote them (a JSON text), so streamed fragments joined equal the non-streamed call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, ClassVar


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text


@dataclass
class Taken:
    """What take_calls found: complete calls, how many characters of the text they used, and whether the
    tool-call section is over (then the rest of the text is plain content again)."""

    calls: list[ToolCall]
    consumed: int
    done: bool


class ToolParser:
    name: ClassVar[str]
    needs_special_tokens: ClassVar[bool] = False  # its markers are special tokens, so the text must keep them
    template_hints: ClassVar[tuple[str, ...]] = ()  # strings in a chat template that name this format

    def find_start(self, content: str, at_start: bool) -> tuple[int, bool]:
        """Where tool calls start in `content` (text not yet shown). -> (position, certain): certain False means
        the text from position on might still become a call (hold it back); position len(content): none."""
        raise NotImplementedError

    def take_calls(self, text: str, final: bool) -> Taken | None:
        """Calls parsed from `text` (which starts at a tool-call start). None once the text is known not to be a
        well-formed call: the caller then shows its first character as text and reads the rest again, so
        nothing is dropped."""
        raise NotImplementedError

    def strict_grammar(self, schemas: dict[str, dict], literal: Callable[[str], str]) -> str | None:
        """A Lark grammar (llguidance's dialect) for an answer in this format that is either plain content or
        calls whose arguments are valid against their function's schema in `schemas` ({name: JSON schema}).
        `literal(text)` is the Lark terminal for a marker: the one token it is in the model's vocabulary, else
        the quoted text. None: this format cannot be constrained that way."""
        return None


def find_marker(content: str, marker: str) -> tuple[int, bool]:
    """find_start for a format whose calls begin with a fixed marker anywhere in the text."""
    at = content.find(marker)
    if at >= 0:
        return at, True
    for keep in range(min(len(marker) - 1, len(content)), 0, -1):  # a partial marker at the end
        if marker.startswith(content[-keep:]):
            return len(content) - keep, False
    return len(content), True


FENCE = "```json"  # the Markdown fence bare JSON calls may come in (the parsers also take a bare ```)
_FENCE_OPENING = re.compile(r"```(?:json)?[ \n]*")
_FENCED = re.compile(r"\s*```(?:json)?[ \n]*(.*?)\s*```\s*", re.DOTALL)


def maybe_bare_call(content: str) -> bool:
    """Whether a whole answer so far may be a call written as bare JSON: nothing yet, an object opening, or one
    inside a Markdown code fence (```json), as Qwen2.5-Coder writes most of its calls."""
    stripped = content.lstrip()
    if "```json".startswith(stripped):
        return True
    opening = _FENCE_OPENING.match(stripped)
    rest = stripped[opening.end():] if opening else stripped
    return not rest or rest[0] == "{"


def unfenced(text: str) -> str:
    """The inside of a whole answer that is one Markdown code fence (```json ... ``` or ``` ... ```), else the
    text."""
    fenced = _FENCED.fullmatch(text)
    return fenced.group(1) if fenced else text


def arguments_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def read_json(text: str, start: int = 0):
    """(value, end) of the JSON value at text[start:] (after whitespace), or None when there is none yet."""
    match = re.compile(r"\s*").match(text, start)
    try:
        return json.JSONDecoder().raw_decode(text, match.end())
    except json.JSONDecodeError:
        return None


def call_from_object(value, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """{"name": ..., "arguments" | "parameters": {...}} -> ToolCall, or None when it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[k] for k in argument_keys if k in value), {})
    return ToolCall(value["name"], arguments_text(arguments))


# Strict calls' grammars: a run of JSON white space is bounded, as in structured_output's JSON (a small model may
# otherwise write spaces until max_tokens), and so is the white space between a call's markers.
STRICT_JSON_OPTIONS = {"whitespace_pattern": r"[\n ]{0,16}"}
GAP = r"/[ \n]{0,24}/"


def calls_schema(schemas: dict[str, dict], arguments_key: str = "arguments", optional: dict | None = None) -> dict:
    """The JSON schema of one {"name", arguments_key} call object to any of the functions (`optional`: more
    properties a format's calls may carry, such as Mistral's call ids)."""
    return {"anyOf": [{"type": "object",
                       "properties": {"name": {"const": name}, arguments_key: schema, **(optional or {})},
                       "required": ["name", arguments_key], "additionalProperties": False}
                      for name, schema in schemas.items()]}


def json_rule(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": STRICT_JSON_OPTIONS}, ensure_ascii=False)


def content_rules(start: str, bare_json: bool) -> list[str]:
    """Lark lines for TEXT, content that holds no call marker `start` (and, for formats whose calls may be bare
    JSON, does not open with `{` or a ```json fence: FENCE, for `fenced_calls`), so that every call of a strict
    answer goes through the call rules."""
    text = r"[ \n]+|[ \n]*[^{ \n](.|\n)*" if bare_json else r"(.|\n)+"
    anything = r"(.|\n)*"
    never = [f"~/{anything}{re.escape(start)}{anything}/", *([f"~/[ \n]*{FENCE}{anything}/"] if bare_json else [])]
    return [f"TEXT: /{text}/ & {' & '.join(never)}", *([f"FENCE: /{FENCE}/"] if bare_json else [])]


def content_and_opening(start: str, literal: Callable[[str], str], bare_json: bool) -> list[str]:
    """`content_rules`, and `opening`: content then the marker `start` that opens the calls. A marker that is
    text joins the content in one terminal, as llguidance's lexer does not step back out of a greedy TEXT; a
    marker that is one token follows it."""
    marker = literal(start)
    opening = [f"opening: TEXT? {marker}"] if marker.startswith("<[") else ["opening: OPENING",
                                                                           f"OPENING: TEXT? {marker}"]
    return [*content_rules(start, bare_json), *opening]



def fenced_calls(calls: str) -> str:
    """A Lark expansion: `calls` inside a ```json code fence (FENCE, from `content_rules`)."""
    return f'{GAP} FENCE {GAP} {calls} {GAP} "```" {GAP}'


TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register(cls: type[ToolParser]) -> type[ToolParser]:
    TOOL_PARSERS[cls.name] = cls
    return cls


def tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}")
    return TOOL_PARSERS[name]()


def detect_tool_parser(chat_template: str | None) -> str | None:
    """The parser whose format the chat template writes, or None (the template has no tool calls we know)."""
    if not chat_template:
        return None
    for cls in TOOL_PARSERS.values():
        if cls.template_hints and all(hint in chat_template for hint in cls.template_hints):
            return cls.name
    return None


from ownllm.parsers.tool_parsers import deepseek_v3, hermes, llama3_json, mistral, pythonic  # noqa: E402,F401
