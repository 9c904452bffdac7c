"""The offline engine end to end on a tiny checkpoint: stopping, streaming, n, seeds, context limits."""

from __future__ import annotations

import pytest

from ownllm import LLM, SamplingParams
from tests.checkpoints import build_checkpoint, random_prompts

PROMPT = random_prompts((12,), seed=5)[0]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=64)
    return LLM(str(folder), dtype="float32")


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 24, "ignore_eos": True, **kwargs})


def _clean_pair(llm, token_ids: list[int]) -> int:
    """Index k such that tokens k and k+1 each decode to printable text (for a stop string across them)."""
    texts = [llm.tokenizer.decode([t]) for t in token_ids]
    for k in range(2, len(texts) - 1):
        if all(t.strip() and "\ufffd" not in t for t in texts[k : k + 2]):
            return k
    pytest.fail(f"no two printable neighbouring tokens in {texts}")


def test_stop_string_spanning_two_tokens(llm):
    full = llm.generate(PROMPT, greedy())[0].outputs[0]
    k = _clean_pair(llm, full.token_ids)
    first, second = llm.tokenizer.decode([full.token_ids[k]]), llm.tokenizer.decode([full.token_ids[k + 1]])
    stop = first[-1] + second[0]
    expected = full.text[: full.text.index(stop)]
    out = llm.generate(PROMPT, greedy(stop=[stop, "never-appears"]))[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (expected, "stop", stop)
    assert len(out.token_ids) < len(full.token_ids)
    kept = llm.generate(PROMPT, greedy(stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == expected + stop
    streamed = "".join(llm.stream(PROMPT, greedy(stop=[stop])))
    assert streamed == expected


def test_stream_joined_equals_generate(llm):
    params = greedy(max_tokens=20)
    assert "".join(llm.stream(PROMPT, params)) == llm.generate(PROMPT, params)[0].outputs[0].text
    assert llm.last_output.finish_reason == "length" and len(llm.last_output.token_ids) == 20


def test_stream_token_ids_yields_once_per_step(llm):
    """One yield per decoded token, also where a token adds no text (stream() then yields nothing): what
    benchmarks time token by token."""
    params = greedy(max_tokens=12)
    steps = list(llm.stream_token_ids(PROMPT, params))
    assert len(steps) == 12 and all(len(step) == 1 for step in steps)
    assert [t for step in steps for t in step] == llm.last_output.token_ids
    assert llm.last_output.token_ids == llm.generate(PROMPT, params)[0].outputs[0].token_ids
    assert len(list(llm.stream(PROMPT, params))) <= len(steps)


def test_stop_token_id_and_max_tokens(llm):
    full = llm.generate(PROMPT, greedy())[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    out = llm.generate(PROMPT, greedy(stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)


def test_eos_ends_generation_unless_ignored(llm):
    full = llm.generate(PROMPT, greedy())[0].outputs[0]
    llm.engine.core.output_processor.eos_token_ids = {full.token_ids[3]}
    try:
        out = llm.generate(PROMPT, greedy(ignore_eos=False))[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason is None and len(out.token_ids) <= 4
        assert len(llm.generate(PROMPT, greedy())[0].outputs[0].token_ids) == 24
    finally:
        llm.engine.core.output_processor.eos_token_ids = set(llm.tokenizer.eos_token_ids)


def test_n_samples_and_seed(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    a = llm.generate(PROMPT, params)[0]
    b = llm.generate(PROMPT, params)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    other = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=43, max_tokens=12, ignore_eos=True))[0]
    assert other.outputs[0].token_ids != a.outputs[0].token_ids


def test_batch_of_prompts_matches_one_by_one(llm):
    prompts = random_prompts((3, 9, 20), seed=8)
    together = llm.generate(prompts, greedy(logprobs=2))
    for prompt, out in zip(prompts, together):
        alone = llm.generate(prompt, greedy(logprobs=2))[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert out.prompt_token_ids == prompt


def test_text_prompt_and_chat(llm):
    out = llm.generate("hello world", greedy(max_tokens=4))[0]
    assert out.prompt == "hello world" and out.prompt_token_ids == llm.tokenizer.encode("hello world")
    chat = llm.chat([{"role": "user", "content": "hi"}], greedy(max_tokens=4))[0]
    assert chat.prompt_token_ids == llm.tokenizer.encode("<s>user: hi\n<s>assistant: ", add_special_tokens=False)


def test_context_limit(llm):
    with pytest.raises(ValueError, match="70 tokens.*64 tokens"):
        llm.generate([5] * 70, greedy())
    out = llm.generate([5] * 50, greedy(max_tokens=None))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 64 - 50
    assert not llm.engine.core.requests and llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks  # all released


def test_bad_token_ids_are_refused(llm):
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**6]], greedy())
