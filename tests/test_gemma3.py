"""Gemma3ForCausalLM vs transformers on a tiny random checkpoint in float32: greedy tokens identical, top-5 logprobs
within 1e-3, for a batch of prompts longer than the sliding window, also with chunked prefill and prefix-cache hits.
The checkpoint has local and global layers with different rope thetas, query_pre_attn_scalar != head_dim, final
logit soft-capping, tied embeddings and random (non-zero) norm weights."""

from __future__ import annotations

import pytest

from ownllm import LLM, SamplingParams
from ownllm.config import ModelConfig
from tests.checkpoints import assert_matches_reference, build_checkpoint, hf_greedy, random_prompts

NEW_TOKENS = 32
GEMMA3 = dict(
    head_dim=32, num_hidden_layers=3, sliding_window=8, rope_local_base_freq=100.0, query_pre_attn_scalar=24,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=30.0,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3")
    return build_checkpoint(folder, "Gemma3ForCausalLM", **GEMMA3), folder


@pytest.fixture(scope="module")
def references(gemma3):
    hf_model, _ = gemma3
    prompts = random_prompts()  # 5, 17 and 40 tokens: two of them past the window of 8
    return prompts, [hf_greedy(hf_model, prompt, NEW_TOKENS) for prompt in prompts]


def assert_matches(llm: LLM, prompts, references) -> None:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)
    for output, reference in zip(llm.generate(prompts, params), references, strict=True):
        assert_matches_reference(output.outputs[0].token_ids, output.outputs[0].logprobs, reference)


@pytest.mark.parametrize("settings", [
    dict(),  # the batch in one step
    dict(max_num_batched_tokens=16, block_size=4),  # chunked prefill, the window across blocks
])
def test_greedy_tokens_and_logprobs_match_transformers(gemma3, references, settings):
    _, folder = gemma3
    assert_matches(LLM(str(folder), dtype="float32", **settings), *references)


def test_prefix_cache_hits_keep_parity(gemma3, references):
    _, folder = gemma3
    prompts, expected = references
    llm = LLM(str(folder), dtype="float32", block_size=4)
    assert_matches(llm, prompts[2:], expected[2:])  # fills the cache with the 40-token prompt
    hits_before = llm.kv_cache.num_hit_tokens
    assert_matches(llm, prompts, expected)  # the same prompt again, now from cached blocks
    assert llm.kv_cache.num_hit_tokens - hits_before >= 36


def test_sliding_window_and_local_rope_matter(tmp_path, gemma3):
    """Guards the parity above: a wider window, or the global rope theta on local layers, changes the output."""
    _, folder = gemma3
    prompt = random_prompts((40,))[0]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=1)

    def cumulative(path) -> float:
        return LLM(str(path), dtype="float32").generate([prompt], params)[0].outputs[0].cumulative_logprob

    baseline = cumulative(folder)
    for name, change in (("wide", dict(sliding_window=64)), ("one_theta", dict(rope_local_base_freq=10000.0))):
        build_checkpoint(tmp_path / name, "Gemma3ForCausalLM", **{**GEMMA3, **change})
        assert cumulative(tmp_path / name) != pytest.approx(baseline, abs=1e-4), name


def test_v4_style_config_normalizes_layer_types_and_local_rope():
    """Real Gemma 3 config.json files (transformers v4): rope_local_base_freq, sliding_window_pattern, and
    rope_scaling that applies to the global layers only."""
    config = ModelConfig.from_hf({
        "architectures": ["Gemma3ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 6,
        "num_attention_heads": 2, "head_dim": 16, "sliding_window": 512, "sliding_window_pattern": 3,
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "query_pre_attn_scalar": 16, "final_logit_softcapping": None,
    })
    assert config.layer_types == ("sliding_attention", "sliding_attention", "full_attention") * 2
    assert (config.rope_theta, config.rope_scaling) == (1e6, {"rope_type": "linear", "factor": 8.0})
    assert config.sliding_rope == (1e4, None)
    assert (config.query_pre_attn_scalar, config.final_logit_softcapping) == (16.0, None)


def test_gguf_matches_transformers(tmp_path):
    """A tiny Gemma 3 written as llama.cpp's converter writes it (F32; norm weights plus 1, Gemma's norm names, no
    local rope theta or layer pattern in the metadata): ownllm loads it as transformers runs the original, given the
    settings llama.cpp hard-codes (local theta 10000, every 6th layer global, scale head_dim**-0.5)."""
    from tests.gguf_writer import write_gguf

    hf_model = build_checkpoint(tmp_path / "hf", "Gemma3ForCausalLM", head_dim=32, num_hidden_layers=6,
                                sliding_window=8, rope_local_base_freq=10000.0, query_pre_attn_scalar=32,
                                tie_word_embeddings=True)
    llm = LLM(str(write_gguf(tmp_path / "hf", tmp_path / "tiny-gemma3.gguf")), dtype="float32")
    assert llm.config.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert_matches(llm, random_prompts(), [hf_greedy(hf_model, p, NEW_TOKENS) for p in random_prompts()])
