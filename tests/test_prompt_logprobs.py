"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers on a tiny float32 checkpoint: every prompt
token's logprob given those before it, its rank and the top alternatives, across a prefill split in chunks, with
n > 1 (computed once) and for a prompt whose blocks are already in the prefix cache."""

from __future__ import annotations

import pytest
import torch

from ownllm import LLM, SamplingParams
from tests.checkpoints import build_checkpoint, random_prompts

PROMPT = random_prompts((40,), seed=3)[0]
TOP = 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    hf_model = build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=128)
    # a 16-token step budget: the 40-token prompt is computed in three chunks
    return LLM(str(folder), dtype="float32", max_num_batched_tokens=16), hf_model


def _reference(hf_model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0].float()  # [T, vocab]
    return logits.log_softmax(-1)


def _check(entries, reference: torch.Tensor, prompt: list[int]) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for position in range(1, len(prompt)):
        row, token = reference[position - 1], prompt[position]
        entry = entries[position]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        for top_id in row.topk(TOP).indices.tolist():
            assert entry[top_id].logprob == pytest.approx(row[top_id].item(), abs=1e-4)


def test_prompt_logprobs_match_transformers(pair):
    llm, hf_model = pair
    reference = _reference(hf_model, PROMPT)
    params = SamplingParams(temperature=0, max_tokens=2, n=2, prompt_logprobs=TOP)
    first = llm.generate([{"prompt_token_ids": PROMPT}], params)[0]
    _check(first.prompt_logprobs, reference, PROMPT)
    again = llm.generate([{"prompt_token_ids": PROMPT}], params)[0]  # its blocks are cached now: computed anyway
    _check(again.prompt_logprobs, reference, PROMPT)
    assert len(first.outputs) == 2 and first.outputs[0].token_ids == first.outputs[1].token_ids


def test_prompt_logprobs_are_absent_unless_asked(pair):
    llm, _ = pair
    assert llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=1))[0].prompt_logprobs is None


def test_negative_prompt_logprobs_are_refused():
    with pytest.raises(ValueError, match="prompt_logprobs must be >= 0, got -1"):
        SamplingParams(prompt_logprobs=-1)
