"""Tool-call and reasoning parsers, and the output layer that streams them (ownllm/parsers).

Each parser reads back what its real chat template writes: a conversation whose assistant turn holds tool calls
is rendered through the template, the model-side text of that turn is cut out, and parsing it must give the
same calls. The streaming reader fed the same text split at every point must give the same calls and content.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ownllm.parsers.events import ContentDelta, Message, OutputStream, ToolCallArguments, ToolCallStart
from ownllm.parsers.reasoning import detect_reasoning_parser, reasoning_parser
from ownllm.parsers.tool_parsers import TOOL_PARSERS, detect_tool_parser, tool_parser
from ownllm.parsers.tool_parsers.json_calls import JsonCallsParser
from tests.test_chat_templates import template_tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
TOOLS = [{"type": "function", "function": {
    "name": name, "description": f"{name} of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}} for name in ("get_weather", "get_time")]
CALLS = [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"city": "São Paulo"})]

# template file, special tokens, parser it must be detected as, calls it can write, text ending the assistant turn
CASES = {
    "qwen3": ({"eos_token": "<|im_end|>"}, "hermes", CALLS, "<|im_end|>\n"),
    "llama3_1": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "llama3_json", CALLS[:1],
                 "<|eot_id|>"),
    "llama4_pythonic": ({"bos_token": "<|begin_of_text|>"}, "pythonic",
                        [("get_weather", {"city": "Paris", "days": "3"}), ("get_time", {"city": "Lyon"})], "<|eot|>"),
    "mistral_nemo": ({"bos_token": "<s>", "eos_token": "</s>"}, "mistral", CALLS, "</s>"),
    "deepseek_v3_tools": ({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}, "deepseek_v3",
                          CALLS, "<｜end▁of▁sentence｜>"),
}


def assistant_text(template_name: str) -> tuple[str, str | None, str]:
    """-> (the tool and reasoning parsers detected from the template, the model-side text of an assistant turn
    holding calls: what follows the generation prompt, up to the end of the turn)."""
    specials, _, calls, turn_end = CASES[template_name]
    template = (TEMPLATES / f"{template_name}.jinja").read_text(encoding="utf-8")
    tokenizer = template_tokenizer(template, specials)
    user = [{"role": "user", "content": "Weather and time in Paris?"}]
    assistant = {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"call{i:05d}", "type": "function", "function": {"name": name, "arguments": arguments}}
        for i, (name, arguments) in enumerate(calls)]}
    prompt = tokenizer.apply_chat_template(user, tools=TOOLS, add_generation_prompt=True)
    conversation = tokenizer.apply_chat_template(user + [assistant], tools=TOOLS, add_generation_prompt=False)
    common = next((i for i, (a, b) in enumerate(zip(prompt, conversation)) if a != b), len(prompt))
    assert prompt[common:].strip() == "", "the turn must continue the generation prompt (but for white space)"
    text = conversation[common:]
    assert turn_end in text, text
    return detect_tool_parser(template), detect_reasoning_parser(template), text[: text.rindex(turn_end)]


def read(text: str, parser: str | None, splits: list[int], reasoning: str | None = None, prompt: str = ""):
    """Feeds `text` cut at `splits` -> (content, reasoning, [(name, arguments)]) and the events."""
    stream = OutputStream(tool_parser(parser) if parser else None,
                          reasoning_parser(reasoning) if reasoning else None, prompt)
    events, start = [], 0
    for end in [*splits, len(text)]:
        events += stream.feed(text[start:end])
        start = end
    events += stream.feed("", final=True)
    message = Message.of(events)
    calls = [(name, json.loads(arguments)) for _, name, arguments in message.tool_calls or []]
    return (message.content, message.reasoning, calls), events


@pytest.mark.parametrize("template_name", list(CASES))
def test_each_parser_reads_back_what_its_template_writes(template_name):
    detected, reasoning_name, text = assistant_text(template_name)
    assert detected == CASES[template_name][1]
    (content, reasoning, calls), _ = read(text, detected, [], reasoning_name)
    assert calls == [(name, arguments) for name, arguments in CASES[template_name][2]]
    assert content.strip() == "" and reasoning == ""  # white space between calls is all the content


@pytest.mark.parametrize("template_name", list(CASES))
def test_streamed_at_every_split_point_gives_the_same_calls(template_name):
    parser, reasoning, text = assistant_text(template_name)
    whole, _ = read(text, parser, [], reasoning)
    for cut in range(len(text) + 1):
        assert read(text, parser, [cut], reasoning)[0] == whole, cut
    assert read(text, parser, list(range(1, len(text))), reasoning)[0] == whole  # one character at a time


SAMPLES = [  # parser, reasoning parser, prompt, answer, expected (content, reasoning, calls)
    ("hermes", "qwen3", "", '<think>\nI could call <tool_call> here</think>\n\nSure. <tool_call>\n{"name": "get_time", '
     '"arguments": {"city": "Paris"}}\n</tool_call>', ("Sure. ", "I could call <tool_call> here",
                                                      [("get_time", {"city": "Paris"})])),
    ("hermes", "qwen3", "", '<think>let me check <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call> '
     'done</think>It is noon.', ("It is noon.", "let me check done", [("get_time", {})])),
    ("hermes", None, "", "No tools needed: <tool_ nothing", ("No tools needed: <tool_ nothing", "", [])),
    ("hermes", None, "", "<tool_call>not json</tool_call>", ("<tool_call>not json</tool_call>", "", [])),
    ("hermes", None, "", '{"name": "get_time", "arguments": {"city": "Oslo"}}\n{"name": "f", "arguments": {}}',
     ("", "", [("get_time", {"city": "Oslo"}), ("f", {})])),  # the tags left out, as small models do
    ("hermes", None, "", '{"name": "x"} is how a call looks', ('{"name": "x"} is how a call looks', "", [])),
    ("hermes", None, "", '```json\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n```',
     ("", "", [("get_time", {"city": "Oslo"})])),  # in a code fence, as Qwen2.5-Coder writes most of its calls
    ("hermes", None, "", '```json\n{"a": 1}\n```', ('```json\n{"a": 1}\n```', "", [])),
    ("hermes", None, "", '```python\nprint({"name": 1})\n```', ('```python\nprint({"name": 1})\n```', "", [])),
    ("llama3_json", None, "", '```json\n{"name": "f", "parameters": {"x": 1}}\n```', ("", "", [("f", {"x": 1})])),
    ("llama3_json", None, "", '{"a": 1} is JSON, not a call', ('{"a": 1} is JSON, not a call', "", [])),
    ("llama3_json", None, "", '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}',
     ("", "", [("f", {"x": 1}), ("g", {})])),
    ("pythonic", None, "", "[1, 2] is a list", ("[1, 2] is a list", "", [])),
    ("pythonic", None, "", '<|python_start|>[f(x=1, y="a, b")]<|python_end|>', ("", "", [("f", {"x": 1, "y": "a, b"})])),
    ("mistral", None, "", 'Let me look. [TOOL_CALLS]get_time{"city": "Rome"}', ("Let me look. ", "", [
        ("get_time", {"city": "Rome"})])),
    (None, "deepseek_r1", "<｜Assistant｜><think>\n", "weighing it</think>\n\nAnswer.", ("Answer.", "weighing it", [])),
    (None, "qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "<think> is just text", (
        "<think> is just text", "", [])),
    (None, "qwen3", "", "thinking that never ends", ("thinking that never ends", "", [])),
]


@pytest.mark.parametrize("parser, reasoning, prompt, answer, expected", SAMPLES)
def test_answers_split_anywhere(parser, reasoning, prompt, answer, expected):
    for cut in range(len(answer) + 1):
        assert read(answer, parser, [cut], reasoning, prompt)[0] == expected, cut
    assert read(answer, parser, list(range(1, len(answer))), reasoning, prompt)[0] == expected


def test_streamed_call_events_come_in_openai_order():
    _, events = read('<tool_call>{"name": "f", "arguments": {"a": [1, 2]}}</tool_call>', "hermes", [5, 20])
    assert [type(e) for e in events] == [ToolCallStart, ToolCallArguments]
    assert events[0].index == events[1].index == 0 and events[0].id.startswith("call_")
    assert json.loads(events[1].fragment) == {"a": [1, 2]}


def test_markup_never_shows_as_content_while_undecided():
    stream = OutputStream(tool_parser("hermes"))
    shown = [e.text for e in stream.feed("Hi <tool") if isinstance(e, ContentDelta)]
    assert shown == ["Hi "]  # "<tool" may be the start of a call: held back


def test_json_calls_of_forced_tool_choices():
    required = '[{"name": "get_time", "parameters": {"city": "Oslo"}}, {"name": "get_weather", "parameters": {}}]'
    stream = OutputStream(JsonCallsParser())
    message = Message.of(stream.feed(required) + stream.feed("", final=True))
    assert [(n, json.loads(a)) for _, n, a in message.tool_calls] == [("get_time", {"city": "Oslo"}),
                                                                      ("get_weather", {})]
    stream = OutputStream(JsonCallsParser("get_time"))
    message = Message.of(stream.feed('{"city": "Oslo"}', final=True))
    assert [(n, json.loads(a)) for _, n, a in message.tool_calls] == [("get_time", {"city": "Oslo"})]


def test_detection_from_templates():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "pythonic", "mistral", "deepseek_v3"}
    assert detect_tool_parser("{{ messages }}") is None and detect_tool_parser(None) is None
    assert detect_reasoning_parser((TEMPLATES / "qwen3.jinja").read_text()) == "qwen3"
    assert detect_reasoning_parser((TEMPLATES / "llama3_1.jinja").read_text()) is None
    smollm2 = (TEMPLATES / "smollm2.jinja").read_text()
    assert detect_reasoning_parser(smollm2) is None


def test_unknown_parser_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown tool-call parser 'qwen'; known: deepseek_v3, hermes, llama3_json"):
        tool_parser("qwen")
    with pytest.raises(ValueError, match="unknown reasoning parser 'o1'; known: deepseek_r1, qwen3"):
        reasoning_parser("o1")


# ---- strict tools under tool_choice auto: each format's grammar takes its template's calls and nothing invalid

MARKERS = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "<｜tool▁calls▁begin｜>",
           "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"]
STRICT_FORMATS = ["qwen3", "llama3_1", "mistral_nemo", "deepseek_v3_tools"]


def byte_tokenizer(markers: list[str]):
    """A byte-level vocabulary (every text encodes) with the call markers as single special tokens, or not."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    from ownllm.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>", *markers])
    eos = backend.token_to_id("<eos>")
    return Tokenizer(backend, chat_template=None, bos_token=None, eos_token="<eos>", eos_token_ids=[eos],
                     special_tokens={})


def strict_matcher(template_name: str, tokenizer, schemas: dict[str, dict]):
    from ownllm.sampling_params import StructuredOutputsParams
    from ownllm.server.answers import _token_literal
    from ownllm.structured_output.llguidance_backend import LLGuidanceBackend

    parser = tool_parser(CASES[template_name][1])
    grammar = parser.strict_grammar(schemas, _token_literal(tokenizer))
    backend = LLGuidanceBackend(tokenizer, tokenizer.backend.get_vocab_size())
    return lambda: backend.compile(StructuredOutputsParams(grammar=grammar)).matcher


def accepts(new_matcher, tokenizer, text: str) -> bool:
    matcher = new_matcher()
    return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()


@pytest.mark.parametrize("markers_are_tokens", [True, False], ids=["marker-tokens", "marker-text"])
@pytest.mark.parametrize("template_name", STRICT_FORMATS)
def test_strict_grammar_takes_valid_calls_and_content_and_refuses_invalid_calls(template_name, markers_are_tokens):
    tokenizer = byte_tokenizer(MARKERS if markers_are_tokens else [])
    text = assistant_text(template_name)[2].split("</think>")[-1]  # the grammar starts after the reasoning
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    valid = strict_matcher(template_name, tokenizer, schemas)
    assert accepts(valid, tokenizer, text)
    assert accepts(valid, tokenizer, "It is sunny in Paris today.")
    days_as_text = {**schemas, "get_weather": {**schemas["get_weather"], "properties": {
        "city": {"type": "string"}, "days": {"type": "string"}}}}
    assert not accepts(strict_matcher(template_name, tokenizer, days_as_text), tokenizer, text)
    assert not accepts(valid, tokenizer, text.replace('"city": "Paris", ', ""))  # a required argument left out


@pytest.mark.parametrize("template_name", ["qwen3", "llama3_1"])
def test_strict_grammar_takes_bare_json_calls_only_when_they_validate(template_name):
    """Bare and in a ```json code fence."""
    tokenizer = byte_tokenizer(MARKERS)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    key = "arguments" if template_name == "qwen3" else "parameters"
    matcher = strict_matcher(template_name, tokenizer, schemas)
    assert accepts(matcher, tokenizer, json.dumps({"name": "get_weather", key: {"city": "Paris"}}))
    assert not accepts(matcher, tokenizer, json.dumps({"name": "get_weather", key: {"town": "Paris"}}))
    fenced = "```json\n{}\n```"
    assert accepts(matcher, tokenizer, fenced.format(json.dumps({"name": "get_weather", key: {"city": "Paris"}})))
    assert not accepts(matcher, tokenizer, fenced.format(json.dumps({"name": "get_weather", key: {"town": "Paris"}})))
    assert not accepts(matcher, tokenizer, fenced.format('{"a": 1}'))  # JSON in that fence is a call
    assert accepts(matcher, tokenizer, "```python\nprint(1)\n```")  # other code is content
