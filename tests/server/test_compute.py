"""The `compute` request field through the official openai client (extra_body) against a real `ownllm serve` on a
tiny checkpoint: one chosen choice plus the compute object, usage over all samples, streaming progress then the
answer, early stop saving samples, and bad input -> 400 naming the field."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import TINY_NAME, start_server

MESSAGES = [{"role": "user", "content": "The quick brown fox"}]
FIRST_CHAR = r"regex:^\s*(\S)"  # a tiny random model's 'answer': the first visible character


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def narrow_server(tiny_model, tmp_path_factory):
    """Two sequences at a time (so samples finish one after another) and at most 6 samples a request."""
    with start_server(tmp_path_factory.mktemp("logs"), str(tiny_model), "--served-model-name", TINY_NAME,
                      "--max-num-seqs", "2", "--max-compute-samples", "6") as server:
        yield server


def narrow_client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def check_summary(compute: dict, samples: int) -> None:
    assert compute["samples"] == samples
    assert compute["samples_run"] + compute["samples_saved"] == samples
    assert sum(a["count"] for a in compute["answers"]) == compute["samples_run"]
    assert 0 <= compute["chosen_index"] < samples
    per_sample = compute["per_sample"]  # every sample, so an eval can replay fewer
    assert [s["index"] for s in per_sample] == list(range(samples))
    assert sum(s["num_tokens"] for s in per_sample) == compute["completion_tokens"]
    assert sorted(s["answer"] for s in per_sample if s["finish_reason"] != "abort") == sorted(
        a["answer"] for a in compute["answers"] for _ in range(a["count"]))


def test_chat_vote_returns_one_choice_with_the_compute_object(client, tiny_server):
    answer = client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=6, seed=1,
        extra_body={"ignore_eos": True, "compute": {"strategy": "vote", "samples": 4, "answer": FIRST_CHAR}})
    assert len(answer.choices) == 1 and answer.choices[0].finish_reason == "length"
    compute = answer.model_extra["compute"]
    check_summary(compute, 4)
    assert compute["samples_run"] == 4 and compute["completion_tokens"] == 24
    assert answer.usage.completion_tokens == 24  # usage counts every sample
    top = max(a["count"] for a in compute["answers"])
    assert compute["answer"] in {a["answer"] for a in compute["answers"] if a["count"] == top}
    assert compute["answer"] == answer.choices[0].message.content.strip()[0]
    assert tiny_server.wait_idle()["ownllm_kv_cache_blocks_used"] == 0


def test_completion_best_of_logprob(client):
    answer = client.completions.create(
        model=TINY_NAME, prompt="Numbers 0123", max_tokens=5, seed=2,
        extra_body={"ignore_eos": True, "compute": {"strategy": "best_of", "samples": 3, "answer": "text"}})
    compute = answer.model_extra["compute"]
    check_summary(compute, 3)
    assert compute["score"] is not None and compute["score"] < 0  # a mean token logprob
    assert answer.usage.completion_tokens == 15 and len(answer.choices) == 1


def test_chat_stream_sends_progress_then_the_answer(client):
    chunks = list(client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=6, seed=1, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "compute": {"samples": 4, "answer": FIRST_CHAR}}))
    full = client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=6, seed=1,
        extra_body={"ignore_eos": True, "compute": {"samples": 4, "answer": FIRST_CHAR}})
    progress = [c.model_extra["compute_progress"] for c in chunks if c.model_extra.get("compute_progress")]
    assert progress and progress[-1]["samples_done"] == 4 and all(p["samples"] == 4 for p in progress)
    assert [p["samples_done"] for p in progress] == sorted(p["samples_done"] for p in progress)
    [final] = [c for c in chunks if c.model_extra.get("compute")]
    assert final.choices[0].delta.content == full.choices[0].message.content  # seeded: the same samples
    assert final.choices[0].finish_reason == "length" and final.model_extra["compute"] == full.model_extra["compute"]
    assert chunks[-1].usage.completion_tokens == 24


def test_completion_stream(client):
    chunks = list(client.completions.create(
        model=TINY_NAME, prompt="Numbers 0123", max_tokens=4, stream=True,
        extra_body={"ignore_eos": True, "compute": {"samples": 2}}))
    assert [c.model_extra["compute_progress"]["samples_done"] for c in chunks[:-1]][-1] == 2
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model_extra["compute"]["samples"] == 2


def test_early_stop_saves_samples_and_frees_their_blocks(narrow_server):
    """Greedy samples all agree: the first wave is 4 of 6 (two run at a time), and once its 4 agree the last 2 cannot
    change the vote, so they never start."""
    answer = narrow_client(narrow_server).chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True, "compute": {"samples": 6, "answer": "text", "early_stop": True}})
    compute = answer.model_extra["compute"]
    check_summary(compute, 6)
    assert compute["samples_saved"] == 2 and compute["agreement"] == 1.0
    assert [s["num_tokens"] for s in compute["per_sample"]] == [5, 5, 5, 5, 0, 0]
    assert compute["completion_tokens"] == 4 * 5 and answer.usage.completion_tokens == compute["completion_tokens"]
    assert narrow_server.wait_idle()["ownllm_kv_cache_blocks_used"] == 0


@pytest.mark.parametrize("extra, param, message", [
    ({"compute": {"samples": 0}}, "compute.samples", "compute.samples must be at least 1, got 0"),
    ({"compute": {"samples": 7}}, "compute.samples",
     "compute.samples must be at most 6 (the server's --max-compute-samples), got 7"),
    ({"compute": {"strategy": "majority"}}, "compute.strategy",
     "compute.strategy must be vote or best_of, got 'majority'"),
    ({"compute": {"answer": "letter"}}, "compute.answer",
     "compute.answer must be number, boxed, choice, json:FIELD, regex:PATTERN or text, got 'letter'"),
    ({"compute": {"samples": 2}, "n": 2}, "n",
     "compute cannot be combined with n > 1: compute.samples sets the number of samples"),
    ({"compute": {"budget": 2}}, "compute.budget", "compute.budget: Extra inputs are not permitted"),
])
def test_bad_compute_is_a_400_naming_the_field(narrow_server, extra, param, message):
    with pytest.raises(openai.BadRequestError) as error:
        narrow_client(narrow_server).chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=2,
                                                             extra_body=extra)
    body = error.value.body
    assert (body["param"], body["message"]) == (param, message)


def test_bad_compute_on_completions(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=TINY_NAME, prompt=["a", "b"], max_tokens=2,
                                  extra_body={"compute": {"samples": 2}})
    assert (error.value.body["param"], error.value.body["message"]) == ("prompt", "compute takes one prompt, got 2")


def test_best_of_verifier_scores_with_the_served_model(client):
    plain = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=3,
                                           extra_body={"ignore_eos": True})
    answer = client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=3,
        extra_body={"ignore_eos": True, "compute": {"strategy": "best_of", "samples": 2, "scorer": "verifier"}})
    compute = answer.model_extra["compute"]
    check_summary(compute, 2)
    assert 0 <= compute["score"] <= 1  # a probability of "yes"
    assert answer.usage.prompt_tokens > 3 * plain.usage.prompt_tokens  # the prompt, then two verifier prompts
    assert answer.usage.completion_tokens == 2 * 3 + 2  # the samples, then one verifier token each


def test_best_of_verifier_scores_with_the_verifier_model(tiny_model, tmp_path_factory):
    """--verifier-model: the samples are asked about in the verifier's own vocabulary (the bundled SmolLM2's, not
    the tiny model's), and usage counts the verifier's prompt in it."""
    from ownllm.compute.verifier import verifier_messages
    from ownllm.loader.gguf import open_gguf, read_fields
    from ownllm.loader.gguf_tokenizer import tokenizer_from_metadata
    from ownllm.loader.resolve import resolve_model

    bundled = resolve_model(None)
    with start_server(tmp_path_factory.mktemp("logs"), str(tiny_model), "--served-model-name", TINY_NAME,
                      "--verifier-model", str(bundled)) as server:
        client = narrow_client(server)
        plain = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=3,
                                               extra_body={"ignore_eos": True})
        answer = client.chat.completions.create(
            model=TINY_NAME, messages=MESSAGES, max_tokens=3,
            extra_body={"ignore_eos": True, "compute": {"strategy": "best_of", "samples": 1, "scorer": "verifier"}})
    verifier_tokenizer = tokenizer_from_metadata(read_fields(open_gguf(bundled)))
    verifier_prompt = verifier_tokenizer.encode_chat(verifier_messages(MESSAGES, answer.choices[0].message.content))
    assert answer.usage.prompt_tokens == plain.usage.prompt_tokens + len(verifier_prompt)
    assert 0 <= answer.model_extra["compute"]["score"] <= 1


def test_eval_runs_against_a_server(tiny_server):
    from ownllm.evals.run import evaluate, server_solver
    from ownllm.evals.tasks import problems

    solve = server_solver(tiny_server.url, None, 4, 0.7)
    result = evaluate(solve, problems("algebra", count=2), "vote_early_stop", 3)
    assert (result.num_problems, result.samples) == (2, 3)
    assert 2 <= result.tokens_per_problem <= 12  # 3 samples of 1-4 tokens each (an early stop can end some at 0+)
