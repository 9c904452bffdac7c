"""How every API reads an answer, written once: what a request asks of the answer's shape, and each sample's
engine deltas read into events through the output layer (ownllm.parsers.events).

The shape: structured outputs (OpenAI `response_format`, vLLM's `structured_outputs`, Ollama's `format`)
become one StructuredOutputsParams; `tools` with `tool_choice` pick how the answer is read (the model's own
tool-call format for auto, or, for required and named choices, a grammar that makes the answer a JSON call,
as vLLM does); `thinking_budget` or `reasoning_effort` bound the reasoning. Each refusal is a 400 naming the
field. The API modules render the events a SampleReader gives them and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ownllm.outputs import CompletionOutput, RequestOutput
from ownllm.parsers.events import Event, Message, OutputStream, ReasoningDelta
from ownllm.parsers.reasoning import ReasoningParser
from ownllm.parsers.tool_parsers import ToolParser, tool_parser
from ownllm.parsers.tool_parsers.json_calls import JsonCallsParser
from ownllm.sampling_params import StructuredOutputsParams
from ownllm.server.serving import ServerContext, ServerError

REASONING_EFFORT_BUDGETS = {"low": 512, "medium": 2048, "high": 8192}  # thinking tokens


def structured_outputs(values: dict[str, Any], param: str) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**values, source=param)
    except ValueError as error:
        raise ServerError(400, str(error).replace("structured_outputs", param, 1), param=param) from None


def openai_structured_outputs(response_format, field_value) -> StructuredOutputsParams | None:
    """From OpenAI's response_format or vLLM's structured_outputs (not both)."""
    if response_format is not None and response_format.type != "text" and field_value is not None:
        raise ServerError(400, "response_format and structured_outputs cannot both be set", param="response_format")
    if field_value is not None:
        values = {k: v for k, v in field_value.model_dump(by_alias=True).items() if v is not None}
        return structured_outputs(values, "structured_outputs")
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True, source="response_format")
    schema = response_format.json_schema.schema_ if response_format.json_schema else None
    if schema is None:
        raise ServerError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    return StructuredOutputsParams(json=schema, source="response_format")


def ollama_structured_outputs(format_value: str | dict | None) -> StructuredOutputsParams | None:
    if format_value in (None, ""):
        return None
    if format_value == "json":
        return StructuredOutputsParams(json_object=True, source="format")
    if isinstance(format_value, dict):
        return StructuredOutputsParams(json=format_value, source="format")
    raise ServerError(400, f'format must be "json" or a JSON schema, got {format_value!r}', param="format")


def thinking_budget(ctx: ServerContext, budget: int | None = None, effort: str | None = None) -> int | None:
    """The request's budget (refused by the engine on a model that does not reason), else, on a model that
    reasons, its reasoning effort's, else the server's (--reasoning-budget)."""
    if budget is not None or ctx.engine.reasoning_parser is None:
        return budget
    return REASONING_EFFORT_BUDGETS[effort] if effort is not None else ctx.settings.reasoning_budget


@dataclass
class ToolPlan:
    """How a request's tools shape its answer: the parser that reads it, and a grammar when a call is forced."""

    parser: Callable[[], ToolParser] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    keep_special_tokens: bool = False
    grammar_reason: str = "tool_choice required or a named function"  # what asked for the grammar, for errors


def tool_plan(ctx: ServerContext, tools: list[dict] | None, tool_choice: str | dict | None,
              parallel_tool_calls: bool = True) -> ToolPlan:
    """OpenAI's tools and tool_choice (auto | none | required | {"type": "function", "function": {"name"}}).
    Under auto, tools with "strict": true make the answer follow the model's own call format through a grammar
    in which every call's arguments are valid against its function's schema (the other functions' arguments
    are any JSON object)."""
    functions = _functions(tools or [])
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise ServerError(400, 'tool_choice must be "auto", "none", "required" or {"type": "function", '
                              '"function": {"name": ...}}', param="tool_choice")
        if name not in functions:
            raise ServerError(400, f"tool_choice names the function {name!r}, which is not among tools "
                              f"({', '.join(functions) or 'none given'})", param="tool_choice")
        return ToolPlan(lambda: JsonCallsParser(name),
                        StructuredOutputsParams(json=_parameters(functions[name]), source=f"tools ({name})"))
    if choice not in ("auto", "none", "required"):
        raise ServerError(400, f'tool_choice must be "auto", "none", "required" or a named function, got {choice!r}',
                          param="tool_choice")
    if choice != "none" and not functions:
        raise ServerError(400, f'tool_choice "{choice}" needs tools', param="tool_choice")
    if choice == "required":
        return ToolPlan(JsonCallsParser, StructuredOutputsParams(json=_calls_schema(functions, parallel_tool_calls),
                                                                 source="tools"))
    name = ctx.engine.tool_parser_name if choice == "auto" else None
    if name is None:
        return ToolPlan()
    parser = tool_parser(name)
    strict = {n: _parameters(f) if f.get("strict") else {"type": "object"} for n, f in functions.items()}
    grammar = parser.strict_grammar(strict, _token_literal(ctx.engine.tokenizer)) \
        if any(f.get("strict") for f in functions.values()) else None
    if grammar is None and any(f.get("strict") for f in functions.values()):
        raise ServerError(400, f'tools with "strict": true cannot be enforced in the {name} tool-call format of this model '
                          'under tool_choice "auto"; use tool_choice "required" or a named function',
                          param="tools")
    return ToolPlan(lambda: tool_parser(name),
                    StructuredOutputsParams(grammar=grammar, source="tools (strict)") if grammar else None,
                    parser.needs_special_tokens, 'tools with "strict": true')


def _token_literal(tokenizer) -> Callable[[str], str]:
    """A call marker as a grammar terminal: the one token it is in this vocabulary, else its quoted text."""
    def literal(text: str) -> str:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(text, ensure_ascii=False)
    return literal


def _functions(tools: list[dict]) -> dict[str, dict]:
    functions = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ServerError(400, f'tools.{i} must be {{"type": "function", "function": {{"name": ..., '
                              '"parameters": {...}}}}', param=f"tools.{i}")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ServerError(400, f"tools.{i}.function.parameters must be a JSON schema object",
                              param=f"tools.{i}.function.parameters")
        functions[function["name"]] = function
    return functions


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _calls_schema(functions: dict[str, dict], parallel: bool) -> dict:
    """A JSON list of {"name", "parameters"} calls, each valid against its function's schema (vLLM's shape)."""
    calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": _parameters(function)},
              "required": ["name", "parameters"], "additionalProperties": False}
             for name, function in functions.items()]
    return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": calls}}


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls as templates read them: OpenAI sends arguments as JSON text, templates expect objects;
    and a calling message's content null (which templates concatenate) as empty text."""
    result = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message = {**message, "tool_calls": [_with_object_arguments(call) for call in calls]}
            if message.get("content") is None:
                message["content"] = ""
        result.append(message)
    return result


def _with_object_arguments(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


@dataclass
class SampleReader:
    """One sample's deltas (CompletionOutputs of output_kind "delta") -> events, keeping what the sample has."""

    stream: OutputStream
    reasoning_end_id: int | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def read(self, delta: CompletionOutput) -> list[Event]:
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        events = self.stream.feed(delta.text, final=delta.finished)
        self.events += events
        if delta.finished:
            self.finish_reason = delta.finish_reason
            if self.stream.num_calls and delta.finish_reason == "stop":
                self.finish_reason = "tool_calls"
            self.stop_reason = delta.stop_reason
        return events

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def message(self) -> Message:
        return Message.of(self.events)

    def reasoning_tokens(self) -> int:
        """Tokens up to the end of the reasoning (all of them while it has not ended)."""
        if not any(isinstance(e, ReasoningDelta) for e in self.events):
            return 0
        if self.reasoning_end_id is not None and self.reasoning_end_id in self.token_ids:
            return self.token_ids.index(self.reasoning_end_id) + 1
        return len(self.token_ids)


async def read_all(outputs: AsyncIterator[RequestOutput], readers: list[SampleReader]) -> None:
    """Feeds every delta of a request's samples to its sample's reader."""
    async for output in outputs:
        for delta in output.outputs:
            readers[delta.index].read(delta)


def reader_factory(ctx: ServerContext, prompt_ids: list[int], tools: ToolPlan | None) -> Callable[[], SampleReader]:
    """Readers for a request's samples: its tool parser, and the model's reasoning parser (None: no reasoning)."""
    reasoning: ReasoningParser | None = ctx.engine.reasoning_parser
    prompt = ctx.engine.tokenizer.decode(prompt_ids[-64:], skip_special_tokens=False) if reasoning else ""
    ids = reasoning.tag_token_ids(ctx.engine.tokenizer) if reasoning else None
    end_id = ids[1] if ids else None
    parser = tools.parser if tools else None
    return lambda: SampleReader(OutputStream(parser() if parser else None, reasoning, prompt), end_id)
