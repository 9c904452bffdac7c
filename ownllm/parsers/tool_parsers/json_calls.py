"""The answer of a forced tool choice, which a grammar made JSON: a list of {"name", "parameters"} calls
(tool_choice "required") or the arguments of the one named function. Not a model's format, so it is not in
the registry: the server picks it for those choices."""

from __future__ import annotations

from ownllm.parsers.tool_parsers import Taken, ToolCall, ToolParser, arguments_text, call_from_object, read_json


class JsonCallsParser(ToolParser):
    name = "json_calls"

    def __init__(self, function_name: str | None = None) -> None:
        self.function_name = function_name  # None: a list of calls

    def find_start(self, content: str, at_start: bool) -> tuple[int, bool]:
        return (0, True) if at_start else (len(content), True)

    def take_calls(self, text: str, final: bool) -> Taken | None:
        if not final:
            return Taken([], 0, done=False)
        parsed = read_json(text)
        if not parsed or text[parsed[1]:].strip():
            return None
        value = parsed[0]
        if self.function_name is not None:
            return Taken([ToolCall(self.function_name, arguments_text(value))], len(text), done=True)
        items = value if isinstance(value, list) else []
        calls = [call_from_object(item, ("parameters", "arguments")) for item in items]
        return Taken(calls, len(text), done=True) if calls and None not in calls else None
