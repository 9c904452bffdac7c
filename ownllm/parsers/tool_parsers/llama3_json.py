"""Llama 3.1 / 3.3 calls: a JSON object {"name": ..., "parameters": {...}} as the whole answer, often after
`<|python_tag|>` (a special token); several calls are separated by `;`."""

from __future__ import annotations

from ownllm.parsers.tool_parsers import (
    GAP, Taken, ToolParser, call_from_object, calls_schema, content_rules, fenced_calls, json_rule, maybe_bare_call,
    read_json, register, unfenced,
)

PYTHON_TAG = "<|python_tag|>"


@register
class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    needs_special_tokens = True
    template_hints = ('"parameters": dictionary of argument name and its value',)

    def find_start(self, content: str, at_start: bool) -> tuple[int, bool]:
        at = content.find(PYTHON_TAG)
        if at >= 0:
            return at, True
        if at_start and (maybe_bare_call(content) or PYTHON_TAG.startswith(content.lstrip())):
            return 0, False  # maybe a call: decided when the answer is complete
        return len(content), True

    def take_calls(self, text: str, final: bool) -> Taken | None:
        if not final:
            return Taken([], 0, done=False)
        body = text.lstrip()
        body = body[len(PYTHON_TAG):] if body.startswith(PYTHON_TAG) else unfenced(body)
        calls, at = [], 0
        while True:
            parsed = read_json(body, at)
            call = call_from_object(parsed[0]) if parsed else None
            if call is None:
                return None
            calls.append(call)
            rest = body[parsed[1]:].lstrip()
            if not rest:
                return Taken(calls, len(text), done=True)
            if not rest.startswith(";"):
                return None
            at = len(body) - len(rest) + 1

    def strict_grammar(self, schemas, literal) -> str:
        calls = f'body ({GAP} ";" {GAP} body)*'
        return "\n".join([
            f"start: TEXT? | {literal(PYTHON_TAG)}? {calls} | {fenced_calls(calls)}",  # its calls open the answer
            f"body: {json_rule(calls_schema(schemas, 'parameters'))}",
            *content_rules(PYTHON_TAG, bare_json=True),
        ])
