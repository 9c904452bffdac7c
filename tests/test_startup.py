"""What loading a model and generating from a plain prompt may import: the offline path (`from ownllm import LLM`,
LLM(model), generate) never imports the server's libraries, transformers, the grammar backends, Pillow or jinja2
(each is imported when its feature is first used)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

NEVER_OFFLINE = ("fastapi", "uvicorn", "starlette", "pydantic", "transformers", "xgrammar", "llguidance", "PIL",
                 "jinja2")
OFFLINE = """
import json, sys
import ownllm
from ownllm import LLM, SamplingParams
llm = LLM()
llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=2))
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_the_offline_path_imports_no_server_or_optional_library():
    out = subprocess.run([sys.executable, "-c", OFFLINE], check=True, capture_output=True, text=True).stdout
    imported = set(json.loads(out.strip().splitlines()[-1]))
    assert "torch" in imported  # the check ran the path
    assert sorted(imported & set(NEVER_OFFLINE)) == []


def test_a_chat_prompt_imports_jinja2_when_it_comes():
    code = OFFLINE.replace('llm.generate("The capital of France is"', 'llm.generate(llm.chat_prompt([{"role": "user", "content": "Hi"}])')
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    imported = set(json.loads(out.strip().splitlines()[-1]))
    assert "jinja2" in imported and not imported & {"fastapi", "uvicorn", "pydantic", "transformers"}
