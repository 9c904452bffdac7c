"""/v1/completions with echo and logprobs, as lm-evaluation-harness scores a continuation (prompt token ids, echo,
max_tokens 1, logprobs 1): the prompt comes back with its tokens' logprobs, the first null, each equal to the
offline engine's prompt logprobs (themselves checked against transformers), then the generated token's; a
streamed answer carries the same."""

from __future__ import annotations

import json
import math

import httpx

from ownllm import SamplingParams
from tests.checkpoints import random_prompts
from tests.server.conftest import TINY_NAME

PROMPTS = random_prompts((7, 12), seed=4)
BODY = {"model": TINY_NAME, "prompt": PROMPTS, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}


def test_echo_logprobs_score_the_prompt(tiny_server, tiny_llm):
    answer = httpx.post(f"{tiny_server.url}/v1/completions", json=BODY, timeout=60).json()
    expected = tiny_llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                                 SamplingParams(temperature=0, max_tokens=1, logprobs=1, prompt_logprobs=1))
    decode = tiny_llm.tokenizer.decode
    for prompt, choice, reference in zip(PROMPTS, answer["choices"], expected):
        logprobs, generated = choice["logprobs"], reference.outputs[0]
        tokens = prompt + generated.token_ids
        assert choice["text"] == decode(prompt) + generated.text
        assert logprobs["tokens"] == [decode([t], skip_special_tokens=False) for t in tokens]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        entries = reference.prompt_logprobs[1:] + generated.logprobs
        for got, top, token, entry in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], tokens[1:],
                                          entries):
            assert math.isclose(got, entry[token].logprob, abs_tol=1e-4)
            assert max(top.values()) >= got  # lm-eval's is_greedy: the token's logprob is the top one's
        offsets = logprobs["text_offset"]
        assert offsets == [sum(map(len, logprobs["tokens"][:i])) for i in range(len(tokens))]


def test_streamed_echo_logprobs_equal_the_whole_answer(tiny_server):
    whole = httpx.post(f"{tiny_server.url}/v1/completions", json=BODY, timeout=60).json()["choices"]
    streamed = {i: {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []} for i in range(len(PROMPTS))}
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", json={**BODY, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line.removeprefix("data: "))["choices"]:
                    folded = streamed[choice["index"]]
                    folded["text"] += choice["text"]
                    for key in ("tokens", "token_logprobs", "text_offset"):
                        folded[key] += choice["logprobs"][key]
    for choice in whole:
        assert streamed[choice["index"]] == {"text": choice["text"], **{
            key: choice["logprobs"][key] for key in ("tokens", "token_logprobs", "text_offset")}}
