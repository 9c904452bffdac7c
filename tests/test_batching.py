"""Continuous batching is invisible in the results: concurrent, chunked, prefix-cached and preempted requests
get the tokens (and, in float32, the logprobs) they get alone in one cold prefill."""

from __future__ import annotations

import random

import pytest

from ownllm import LLM, SamplingParams
from ownllm.sampling_params import SamplingParams as Params
from tests.checkpoints import build_checkpoint, random_prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=256)
    return folder


def mixed_requests(count: int, seed: int = 0) -> tuple[list[list[int]], list[Params]]:
    rng = random.Random(seed)
    lengths = [rng.randint(2, 70) for _ in range(count)]
    prompts = random_prompts(lengths, seed=seed)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=True, logprobs=3)
              for _ in range(count)]
    return prompts, params


def alone(llm: LLM, prompts, params):
    return [llm.generate([p], q)[0].outputs[0] for p, q in zip(prompts, params)]


def assert_same(outputs, references, tol: float = 1e-4):
    for i, (out, ref) in enumerate(zip(outputs, references)):
        assert out.token_ids == ref.token_ids, f"request {i}"
        for a, b in zip(out.logprobs, ref.logprobs):
            for token_id, logprob in b.items():
                assert abs(a[token_id].logprob - logprob.logprob) < tol, f"request {i}"


def test_concurrent_requests_match_alone(folder):
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=64)
    prompts, params = mixed_requests(20)
    together = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert_same(together, alone(llm, prompts, params))
    assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks


def test_chunked_prefill_matches_one_piece(folder):
    cold = LLM(str(folder), dtype="float32", enable_prefix_caching=False)
    chunked = LLM(str(folder), dtype="float32", enable_prefix_caching=False, max_num_batched_tokens=7)
    prompts, params = mixed_requests(6, seed=1)
    assert_same(alone(chunked, prompts, params), alone(cold, prompts, params))


def test_prefix_cache_hits_match_cold_prefill(folder):
    cold = LLM(str(folder), dtype="float32", enable_prefix_caching=False)
    cached = LLM(str(folder), dtype="float32", block_size=8)
    system = random_prompts((50,), seed=3)[0]
    prompts = [system + tail for tail in random_prompts((3, 9, 17), seed=4)]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)] * 3
    outputs = alone(cached, prompts, params)
    stats = cached.engine.stats()
    assert stats["prefix_cache_hits"] >= 2 * 48  # the 2nd and 3rd reuse 6 full blocks of the shared prefix
    assert_same(outputs, alone(cold, prompts, params))


def test_preemption_under_a_small_cache_matches_unconstrained(folder):
    roomy = LLM(str(folder), dtype="float32")
    tight = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=40)
    prompts, params = mixed_requests(12, seed=2)
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3) for _ in params]
    together = [o.outputs[0] for o in tight.generate(prompts, params)]
    assert tight.engine.stats()["num_preemptions"] > 0
    assert_same(together, alone(roomy, prompts, params))
    assert tight.kv_cache.num_free_blocks == 40


def test_n_samples_share_their_prompt_blocks(folder):
    llm = LLM(str(folder), dtype="float32", block_size=8)
    prompt = random_prompts((30,), seed=6)[0]  # 3 full blocks and a partial one
    llm.engine.add_request("r", prompt, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True))
    llm.engine.step()  # sample 1 prefills
    llm.engine.step()  # samples 2 and 3 join, hitting its cached blocks
    tables = [llm.kv_cache.block_ids(f"r#{i}") for i in range(3)]
    assert tables[0][:3] == tables[1][:3] == tables[2][:3]
    assert len({t[3] for t in tables}) == 3  # each has a private last block (copy on write)
    assert [llm.kv_cache.pool.blocks[b].ref_cnt for b in tables[0][:3]] == [3, 3, 3]
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks


@pytest.mark.slow
def test_bundled_model_sixteen_concurrent_requests_match_alone():
    llm = LLM(dtype="float32")
    questions = [f"Tell me fact number {i} about {topic}." for i, topic in enumerate(
        ["the sea", "cats", "Paris", "python", "the moon", "tea", "rain", "music"] * 2)]
    prompts = [llm.chat_prompt([{"role": "user", "content": q}]) for q in questions]
    params = [SamplingParams(temperature=0, max_tokens=4 + (i * 5) % 13) for i in range(len(prompts))]
    together = [o.outputs[0] for o in llm.generate(prompts, params)]
    for out, ref in zip(together, alone(llm, prompts, params)):
        assert out.token_ids == ref.token_ids
