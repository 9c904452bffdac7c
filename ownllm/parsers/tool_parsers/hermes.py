"""Hermes-style calls (Qwen2.5, Qwen3, SmolLM and NousResearch templates): each call is
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several in a row for parallel calls. Small models
(Qwen2.5-Coder-0.5B) often drop the tags: a whole answer that is such a JSON object, or several on their own
lines, bare or in a ```json code fence, is read as calls too."""

from __future__ import annotations

from ownllm.parsers.tool_parsers import (
    GAP, Taken, ToolParser, call_from_object, calls_schema, content_and_opening, fenced_calls, find_marker,
    json_rule, maybe_bare_call, read_json, register, unfenced,
)

START, END = "<tool_call>", "</tool_call>"


@register
class HermesToolParser(ToolParser):
    name = "hermes"
    template_hints = (START,)

    def find_start(self, content: str, at_start: bool) -> tuple[int, bool]:
        if at_start and maybe_bare_call(content):
            return 0, False  # decided when the answer is complete
        return find_marker(content, START)

    def take_calls(self, text: str, final: bool) -> Taken | None:
        if text.lstrip().startswith(("{", "`")):  # a bare JSON answer, or one fenced as code
            return _bare_calls(text) if final else Taken([], 0, done=False)
        calls, consumed = [], 0
        while True:
            start = text.find(START, consumed)
            if start < 0 or text[consumed:start].strip():  # text that is not a call ends the section
                return Taken(calls, consumed, done=final or bool(text[consumed:].strip()))
            broken = Taken(calls, consumed, done=True) if calls else None  # the calls before a malformed one
            opening = text[start + len(START):].lstrip()
            if opening and opening[0] != "{":
                return broken
            end = text.find(END, start)
            if end < 0:
                return broken if final else Taken(calls, consumed, done=False)
            parsed = read_json(text, start + len(START))
            call = call_from_object(parsed[0]) if parsed and not text[parsed[1]:end].strip() else None
            if call is None:
                return broken
            calls.append(call)
            consumed = end + len(END)

    def strict_grammar(self, schemas, literal) -> str:
        call = f"body {GAP} {literal(END)}"
        bare = f"body ({GAP} body)*"  # calls without the tags, as small models write them
        return "\n".join([
            f"start: TEXT? | opening {GAP} {call} ({GAP} {literal(START)} {GAP} {call})* {GAP}"
            f" | {GAP} {bare} {GAP} | {fenced_calls(bare)}",
            f"body: {json_rule(calls_schema(schemas))}",
            *content_and_opening(START, literal, bare_json=True),
        ])


def _bare_calls(answer: str) -> Taken | None:
    calls, at, text = [], 0, unfenced(answer)
    while text[at:].strip():
        parsed = read_json(text, at)
        call = call_from_object(parsed[0], ("arguments",)) if parsed else None
        if call is None:
            return None
        calls.append(call)
        at = parsed[1]
    return Taken(calls, len(answer), done=True) if calls else None
