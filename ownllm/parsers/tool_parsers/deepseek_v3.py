"""DeepSeek-V3 calls: `<｜tool▁calls▁begin｜>` then, per call,
`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>`, then `<｜tool▁calls▁end｜>`."""

from __future__ import annotations

import json
import re

from ownllm.parsers.tool_parsers import (
    GAP, Taken, ToolCall, ToolParser, arguments_text, content_and_opening, find_marker, json_rule, read_json, register,
)

START, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_START, SEP, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
CALL = re.compile(r"<｜tool▁call▁begin｜>\s*\w*\s*<｜tool▁sep｜>\s*([^\n<]+?)\s*\n\s*```(?:json)?\s*(.*?)\s*```\s*"
                  r"<｜tool▁call▁end｜>", re.S)


@register
class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"
    needs_special_tokens = True
    template_hints = ("tool▁calls▁begin",)

    def find_start(self, content: str, at_start: bool) -> tuple[int, bool]:
        return find_marker(content, START)

    def take_calls(self, text: str, final: bool) -> Taken | None:
        end = text.find(END)
        if end < 0 and not final:
            return Taken([], 0, done=False)
        section = text[len(START): end if end >= 0 else len(text)]
        calls = []
        for match in CALL.finditer(section):
            parsed = read_json(match.group(2))
            if not parsed or not isinstance(parsed[0], dict):
                return None
            calls.append(ToolCall(match.group(1), arguments_text(parsed[0])))
        if not calls:
            return None
        return Taken(calls, end + len(END) if end >= 0 else len(text), done=True)

    def strict_grammar(self, schemas, literal) -> str:
        names = list(schemas)
        rules = [f"start: TEXT? | opening ({GAP} call)+ {GAP} {literal(END)}",
                 "call: " + " | ".join(f"call_{i}" for i in range(len(names)))]
        for i, name in enumerate(names):
            rules += [f'call_{i}: {literal(CALL_START)} "function" {literal(SEP)} {json.dumps(name, ensure_ascii=False)}'
                      f' "\\n```json\\n" args_{i} "\\n```" {literal(CALL_END)}',
                      f"args_{i}: {json_rule(schemas[name])}"]
        return "\n".join(rules + content_and_opening(START, literal, bare_json=False))
