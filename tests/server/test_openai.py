"""The OpenAI API through the official `openai` client against a real `ownllm serve` on a tiny checkpoint:
chat and legacy completions, streaming, n, logprobs, usage, stop strings, seeds, and the errors the
client raises. Greedy answers must equal the offline engine's token for token."""

from __future__ import annotations

import math

import openai
import pytest

from ownllm import SamplingParams
from tests.checkpoints import random_prompts
from tests.server.conftest import TINY_CONTEXT, TINY_NAME

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
PROMPT_IDS = random_prompts((9,), seed=3)[0]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [TINY_NAME]
    assert client.models.retrieve(TINY_NAME).id == TINY_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_greedy_equals_offline_engine(client, tiny_llm):
    answer = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=12, **GREEDY)
    expected = tiny_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == "length"
    prompt_tokens = len(tiny_llm.tokenizer.encode_chat(MESSAGES))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12)


def test_completion_greedy_token_for_token(client, tiny_llm):
    answer = client.completions.create(model=TINY_NAME, prompt=PROMPT_IDS, max_tokens=10, logprobs=3, **GREEDY)
    expected = tiny_llm.generate(PROMPT_IDS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3))
    out = expected[0].outputs[0]
    choice = answer.choices[0]
    assert choice.text == out.text
    assert choice.logprobs.tokens == [tiny_llm.tokenizer.decode([t], skip_special_tokens=False) for t in out.token_ids]
    for got, entry, token_id in zip(choice.logprobs.token_logprobs, out.logprobs, out.token_ids):
        assert math.isclose(got, entry[token_id].logprob, abs_tol=1e-4)
    for token, top in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs):
        assert 1 <= len(top) <= 3 and top[token] == max(top.values())  # greedy; token strings may repeat
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_chat_stream_with_usage(client):
    full = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=10, **GREEDY)
    chunks = list(client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=10, stream=True, stream_options={"include_usage": True},
        **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_completion_stream(client):
    full = client.completions.create(model=TINY_NAME, prompt="Numbers 0123", max_tokens=8, **GREEDY)
    chunks = list(client.completions.create(model=TINY_NAME, prompt="Numbers 0123", max_tokens=8, stream=True,
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_samples(client):
    answer = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, n=2, max_tokens=6, temperature=1.0,
                                            seed=7, extra_body={"ignore_eos": True})
    assert [c.index for c in answer.choices] == [0, 1]
    assert answer.usage.completion_tokens == 12
    stream = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, n=2, max_tokens=6, temperature=1.0,
                                            seed=7, stream=True, extra_body={"ignore_eos": True})
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in answer.choices]


def test_completion_batch_prompts(client):
    answer = client.completions.create(model=TINY_NAME, prompt=["Numbers 0123", "def main():"], n=2, max_tokens=4,
                                       **GREEDY)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.choices[0].text == answer.choices[1].text  # greedy samples agree
    single = client.completions.create(model=TINY_NAME, prompt="def main():", max_tokens=4, **GREEDY)
    assert answer.choices[2].text == single.choices[0].text


def test_chat_logprobs(client):
    answer = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=5, logprobs=True,
                                            top_logprobs=3, **GREEDY)
    content = answer.choices[0].logprobs.content
    assert len(content) == 5
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)  # greedy: the best token
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_stop_string_and_seed(client):
    full = client.completions.create(model=TINY_NAME, prompt="The quick brown", max_tokens=24, **GREEDY).choices[0].text
    stop = next(ch for ch in full[3:] if ch.isalnum())
    cut = client.completions.create(model=TINY_NAME, prompt="The quick brown", max_tokens=24, stop=[stop], **GREEDY)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=TINY_NAME, prompt="The quick brown", max_tokens=8, temperature=1.0,
                                         seed=11).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_max_completion_tokens_and_context_default(client):
    answer = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_completion_tokens=3, **GREEDY)
    assert answer.usage.completion_tokens == 3
    long_prompt = random_prompts((TINY_CONTEXT - 5,), seed=2)[0]
    to_context = client.completions.create(model=TINY_NAME, prompt=long_prompt, **GREEDY)  # no max_tokens
    assert to_context.usage.completion_tokens == 5 and to_context.choices[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=2), "top_p"),
    (dict(n=0), "n"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(extra_body={"temperature": "hot"}), "temperature"),
    (dict(max_tokens=TINY_CONTEXT), "max_tokens"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "no-such-format"}}}), "response_format"),
    (dict(tool_choice="required"), "tool_choice"),
])
def test_bad_requests_name_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, **kwargs)
    error = raised.value.body
    assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"


def test_context_errors_give_both_lengths(client, tiny_llm):
    prompt_tokens = len(tiny_llm.tokenizer.encode_chat(MESSAGES))
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=TINY_CONTEXT)
    message = raised.value.body["message"]
    assert f"{prompt_tokens} tokens" in message and f"({TINY_CONTEXT})" in message and str(TINY_CONTEXT) in message
    with pytest.raises(openai.BadRequestError, match="context") as raised:
        client.completions.create(model=TINY_NAME, prompt=[5] * (TINY_CONTEXT + 1), max_tokens=1)
    assert raised.value.body["param"] == "prompt"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert raised.value.body["code"] == "model_not_found" and "gpt-4o" in raised.value.body["message"]
    assert client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=2).choices
