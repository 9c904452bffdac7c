"""Speculative decoding is invisible in the results: with greedy decoding every method gives token for token
what decoding without it gives, inside continuous batching, chunked prefill, prefix caching, preemption, n > 1,
logprobs, stop strings and max_tokens; with sampling, the accepted tokens keep the target's distribution."""

from __future__ import annotations

import random

import pytest
import torch

from ownllm import LLM, SamplingParams
from ownllm.sampling_params import SamplingParams as Params
from ownllm.worker.model_runner import RequestState, sample_and_verify
from ownllm.worker.sampler import Sampler
from tests.checkpoints import build_checkpoint, random_prompts

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(autouse=True)
def fixed_draft_cost(monkeypatch):
    """A draft-model draft costs a fixed 0.1 of a target step here, not the measured time, so how many tokens
    each step drafts (and the acceptance the tests count) does not depend on the machine's load."""
    from ownllm.spec_decode.draft_model import DraftModelProposer

    monkeypatch.setattr(DraftModelProposer, "cost_per_draft", lambda self, step_seconds: 0.1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=256)
    return folder


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory, folder):
    """The target with noise on its output layer and one layer fewer: its drafts are right part of the time,
    so steps accept some drafts and reject others."""
    import transformers

    model = build_checkpoint(tmp_path_factory.mktemp("unused"), "LlamaForCausalLM", max_position_embeddings=256)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    torch.manual_seed(9)
    with torch.no_grad():
        model.lm_head.weight += 0.5 * model.lm_head.weight.std() * torch.randn_like(model.lm_head.weight)
    draft = tmp_path_factory.mktemp("draft")
    model.save_pretrained(draft, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (draft / name).write_bytes((folder / name).read_bytes())
    assert isinstance(model, transformers.LlamaForCausalLM)
    return draft


@pytest.fixture(scope="module")
def plain(folder):
    return LLM(str(folder), dtype="float32")


def repetitive_prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts with repeated runs, so prompt lookup finds drafts, of mixed lengths."""
    rng = random.Random(seed)
    prompts = []
    for length in (rng.randint(3, 40) for _ in range(count)):
        base = random_prompts((max(2, length // 3),), seed=rng.randint(0, 10**6))[0]
        prompts.append((base * 3)[:length])
    return prompts


def mixed_params(count: int, seed: int) -> list[Params]:
    rng = random.Random(seed)
    return [SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True, logprobs=rng.choice([None, 2]))
            for _ in range(count)]


def assert_same(outputs, references, tol: float = 1e-4):
    for i, (out, ref) in enumerate(zip(outputs, references)):
        assert out.token_ids == ref.token_ids, f"request {i}"
        assert (out.text, out.finish_reason, out.stop_reason) == (ref.text, ref.finish_reason, ref.stop_reason)
        if ref.logprobs is not None:
            for a, b in zip(out.logprobs, ref.logprobs):
                for token_id, logprob in b.items():
                    assert abs(a[token_id].logprob - logprob.logprob) < tol, f"request {i}"


def completions(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def acceptance(llm) -> tuple[int, int]:
    stats = llm.engine.core.stats()
    return stats["spec_decode_accepted_tokens_total"], stats["spec_decode_draft_tokens_total"]


@pytest.mark.parametrize("speculative", ["ngram", "draft_model", "self_draft"])
def test_greedy_tokens_equal_decoding_without_speculation(folder, draft_folder, plain, speculative):
    config = {"ngram": NGRAM, "draft_model": {"method": "draft_model", "model": str(draft_folder), "num_speculative_tokens": 3},
              "self_draft": {"method": "draft_model", "model": str(folder), "num_speculative_tokens": 5}}[speculative]
    llm = LLM(str(folder), dtype="float32", speculative_config=config, max_num_batched_tokens=24)  # chunked prefill
    prompts, params = repetitive_prompts(12, seed=1), mixed_params(12, seed=2)
    assert_same(completions(llm, prompts, params), completions(plain, prompts, params))
    accepted, drafted = acceptance(llm)
    assert 0 < accepted <= drafted
    if speculative == "self_draft":  # the target drafting for itself: every greedy draft is right
        assert accepted == drafted
    elif speculative == "draft_model":  # some right, some wrong
        assert accepted < drafted
    assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks


def test_stop_strings_n_and_prefix_cache_with_speculation(folder, plain):
    llm = LLM(str(folder), dtype="float32", speculative_config=NGRAM, block_size=4)
    prompt = repetitive_prompts(1, seed=4)[0] + [7, 8, 9]
    full = completions(plain, [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]),
              SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, n=3, logprobs=1),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, stop_token_ids=[full.token_ids[5]])]
    for _ in range(2):  # the second round hits the prefix cache the first one filled
        got = llm.generate([prompt] * 3, params)
        want = plain.generate([prompt] * 3, params)
        for g, w in zip(got, want):
            assert_same(g.outputs, w.outputs)
    assert llm.kv_cache.num_hit_tokens > 0


def test_preemption_under_speculation(folder, plain):
    llm = LLM(str(folder), dtype="float32", speculative_config=NGRAM, num_kv_blocks=12, block_size=8)
    prompts, params = repetitive_prompts(8, seed=5), mixed_params(8, seed=6)
    assert_same(completions(llm, prompts, params), completions(plain, prompts, params))
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks


def test_sampled_outputs_are_reproducible_under_a_seed(folder):
    llm = LLM(str(folder), dtype="float32", speculative_config=NGRAM)
    prompt = repetitive_prompts(1, seed=7)[0]
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=20, ignore_eos=True)
    assert completions(llm, [prompt], params)[0].token_ids == completions(llm, [prompt], params)[0].token_ids


def test_a_draft_with_another_tokenizer_is_refused_naming_the_difference(folder, tmp_path):
    other = tmp_path / "other"
    build_checkpoint(other, "LlamaForCausalLM", num_hidden_layers=1)
    tokenizer = (other / "tokenizer.json").read_text().replace('"<unk>"', '"<unknown>"')
    (other / "tokenizer.json").write_text(tokenizer)
    with pytest.raises(ValueError, match="cannot draft for this model: token '<unk>' is id 0 for the target but absent"):
        LLM(str(folder), dtype="float32", speculative_config={"method": "draft_model", "model": str(other)})


# ---- the acceptance rule keeps the target distribution: a two-step Markov chain over 4 tokens

CHAIN = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 1.5, 0.3, -0.5], [1.0, -2.0, 0.8, 0.4], [-0.3, 0.2, 0.0, 1.2]])
DRAFTS = [1, 1]  # an unlikely first draft after token 0, so both outcomes are frequent


def _first_two_tokens(sampler, generator, wrong: bool) -> tuple[int, int]:
    """Runs steps of speculative decoding from prompt [0] until two tokens are out; wrong=True also keeps a
    rejected first draft a fifth of the time, a plausible bug the test must catch."""
    state = RequestState("r", [0], 1, SamplingParams(temperature=1.0), [], 0, generator, list(DRAFTS))
    logits = CHAIN[[0, *DRAFTS]]  # row j: the distribution after the token before it
    tokens, _, accepted = sample_and_verify(sampler, logits.clone(), [state], set())["r"]
    if wrong and accepted == 0 and torch.rand((), generator=generator) < 0.2:
        tokens = [DRAFTS[0]]
    if len(tokens) < 2:
        state.drafts = []
        tokens += sample_and_verify(sampler, CHAIN[[tokens[0]]].clone(), [state], set())["r"][0]
    return tokens[0], tokens[1]


@pytest.mark.parametrize("wrong", [False, True])
def test_accepted_tokens_follow_the_target_distribution(wrong):
    sampler, generator = Sampler(), torch.Generator().manual_seed(2024)
    counts = torch.zeros(4, 4)
    for _ in range(6000):
        counts[_first_two_tokens(sampler, generator, wrong)] += 1
    first = CHAIN[0].softmax(-1)
    expected = (first[:, None] * CHAIN.softmax(-1)).flatten() * counts.sum()
    statistic = float(((counts.flatten() - expected) ** 2 / expected).sum())
    critical = 37.70  # chi-square, 15 degrees of freedom, p = 0.001
    assert (statistic > critical) == wrong, f"chi-square {statistic:.1f}; counts {counts.tolist()}"


def test_draft_length_follows_acceptance_and_cost():
    from ownllm.spec_decode import DraftLength

    assert DraftLength(8, cost_per_draft=0.0).next == 8  # drafts that cost nothing: as many as allowed
    # right 9 times in 10: (1 - 0.9^(k+1)) / 0.1 tokens for 1 + k/2 of the time peaks at k = 3
    assert DraftLength(8, cost_per_draft=0.5, accepted=9.0, rejected=1.0).next == 3
    missing = DraftLength(8, cost_per_draft=0.3)
    for _ in range(3):  # drafts that keep missing: fewer, then none for a while
        assert missing.next > 0
        missing.update(missing.next, 0)
    assert missing.next == 0 and missing.paused == DraftLength.PAUSE
    for _ in range(DraftLength.PAUSE):
        missing.update(0, 0)
    assert missing.next >= 1  # then a probe
    missing.update(1, 1)
    assert not missing.probing
