"""Mistral calls: `[TOOL_CALLS]` (a special token) then a JSON list of {"name", "arguments"} running to the end
of the answer (v11+ tokenizers write `[TOOL_CALLS]name{...}` per call instead: both are read)."""

from __future__ import annotations

import re

from ownllm.parsers.tool_parsers import (
    GAP, Taken, ToolCall, ToolParser, arguments_text, call_from_object, calls_schema, content_and_opening, find_marker,
    json_rule, read_json, register,
)

START = "[TOOL_CALLS]"
NAMED_CALL = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[ARGS\])?")


@register
class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True
    template_hints = (START,)

    def find_start(self, content: str, at_start: bool) -> tuple[int, bool]:
        return find_marker(content, START)

    def take_calls(self, text: str, final: bool) -> Taken | None:
        if not final:
            return Taken([], 0, done=False)
        calls = []
        for section in text.split(START)[1:]:
            parsed = read_json(section)
            if parsed and isinstance(parsed[0], list) and not section[parsed[1]:].strip():
                found = [call_from_object(item) for item in parsed[0]]
                if None in found:
                    return None
                calls += found
                continue
            named = NAMED_CALL.match(section)
            parsed = read_json(section, named.end()) if named else None
            if not parsed or not isinstance(parsed[0], dict) or section[parsed[1]:].strip():
                return None
            calls.append(ToolCall(named.group(1), arguments_text(parsed[0])))
        return Taken(calls, len(text), done=True) if calls else None

    def strict_grammar(self, schemas, literal) -> str:
        calls = {"type": "array", "minItems": 1, "items": calls_schema(schemas, optional={"id": {"type": "string"}})}
        return "\n".join([
            f"start: TEXT? | opening {GAP} calls",
            f"calls: {json_rule(calls)}",
            *content_and_opening(START, literal, bare_json=False),
        ])
