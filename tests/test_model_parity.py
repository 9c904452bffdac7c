"""ownllm vs transformers on tiny random checkpoints in float32: greedy tokens identical, top-5 logprobs within 1e-3."""

from __future__ import annotations

import pytest
import torch

from ownllm import LLM, SamplingParams
from tests.checkpoints import assert_matches_reference, build_checkpoint, hf_greedy, random_prompts

NEW_TOKENS = 32
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

VARIANTS = {
    "llama-gqa-untied": ("LlamaForCausalLM", {}),
    "llama-mha-tied-biases": ("LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                       attention_bias=True, mlp_bias=True)),
    "llama-head_dim-llama3-rope": ("LlamaForCausalLM", dict(head_dim=24, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama-linear-rope-3layers": ("LlamaForCausalLM", dict(num_hidden_layers=3,
                                                           rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral-sliding-window": ("MistralForCausalLM", dict(sliding_window=8)),
    "qwen2-qkv-bias": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2-sliding-layers": ("Qwen2ForCausalLM", dict(num_hidden_layers=3, use_sliding_window=True,
                                                      sliding_window=8, max_window_layers=1)),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", dict(head_dim=32)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = build_checkpoint(folder, arch, **overrides)
    return hf_model, LLM(str(folder), dtype="float32")


def test_greedy_tokens_and_logprobs_match_transformers(pair):
    hf_model, llm = pair
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)
    prompts = random_prompts()
    outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs):
        ours = output.outputs[0]
        assert_matches_reference(ours.token_ids, ours.logprobs, hf_greedy(hf_model, prompt, NEW_TOKENS))
        assert ours.finish_reason == "length"


def test_sliding_window_shorter_than_prompt_matters(tmp_path):
    """Guards the sliding-window test above: with the window the output differs from full attention."""
    arch, overrides = VARIANTS["mistral-sliding-window"]
    build_checkpoint(tmp_path / "w", arch, **overrides)
    build_checkpoint(tmp_path / "full", arch, **{**overrides, "sliding_window": None})
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1)
    prompt = random_prompts((40,))[0]
    windowed = LLM(str(tmp_path / "w"), dtype="float32").generate([prompt], params)[0].outputs[0]
    full = LLM(str(tmp_path / "full"), dtype="float32").generate([prompt], params)[0].outputs[0]
    assert windowed.cumulative_logprob != pytest.approx(full.cumulative_logprob, abs=1e-4)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    build_checkpoint(tmp_path / "single", "LlamaForCausalLM", seed=3)
    build_checkpoint(tmp_path / "sharded", "LlamaForCausalLM", seed=3, max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=3)
    prompts = random_prompts()
    single = LLM(str(tmp_path / "single"), dtype="float32").generate(prompts, params)
    sharded = LLM(str(tmp_path / "sharded"), dtype="float32").generate(prompts, params)
    for a, b in zip(single, sharded):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-5)
