"""Pythonic calls (Llama 3.2 and Llama 4 templates): the answer is a Python list of calls with keyword
arguments, `[get_weather(city="Paris"), get_time()]`, in Llama 4 optionally inside
`<|python_start|>...<|python_end|>`. Arguments are literals; they become a JSON object."""

from __future__ import annotations

import ast
import json
import re

from ownllm.parsers.tool_parsers import Taken, ToolCall, ToolParser, register

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
CALL_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
MAYBE_CALL = re.compile(r"(\[\s*([A-Za-z_][\w.]*\s*)?)?")  # what may still grow into CALL_START


@register
class PythonicToolParser(ToolParser):
    name = "pythonic"
    needs_special_tokens = True
    template_hints = ("[func_name1(",)

    def find_start(self, content: str, at_start: bool) -> tuple[int, bool]:
        if not at_start:  # only a whole answer is a call list
            return len(content), True
        stripped = content.lstrip()
        if PYTHON_START.startswith(stripped):
            return 0, False
        body = stripped.removeprefix(PYTHON_START).lstrip()
        if CALL_START.match(body) or stripped.startswith(PYTHON_START):
            return 0, True
        if MAYBE_CALL.fullmatch(body):
            return 0, False
        return len(content), True

    def take_calls(self, text: str, final: bool) -> Taken | None:
        if not final:
            return Taken([], 0, done=False)
        body = text.strip().removeprefix(PYTHON_START).removesuffix(PYTHON_END).strip()
        try:
            tree = ast.parse(body, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return None
            calls = [_call(node) for node in tree.elts]
        except (SyntaxError, ValueError):
            return None
        return Taken(calls, len(text), done=True)


def _call(node: ast.expr) -> ToolCall:
    if not isinstance(node, ast.Call) or node.args:
        raise ValueError("not a call with keyword arguments")
    name = ast.unparse(node.func)
    arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))
