"""ownllm on a CUDA device (marked `gpu`, skipped without one): the plain-torch paths, against transformers.

float32 on the GPU against transformers float32 on the CPU: greedy tokens identical, top-5 logprobs within
2e-3 (cuBLAS and SDPA sum in other orders). bfloat16 on the GPU, teacher-forced along the float32 run,
within what bf16 moves these random models (0.2 a step, 0.05 on average, as the CPU's bf16 tests allow).
"""

from __future__ import annotations

import pytest
import torch

from ownllm import LLM, SamplingParams
from tests.checkpoints import assert_tracks_reference, build_checkpoint, hf_greedy, random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
NEW_TOKENS = 24


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen3ForCausalLM"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return folder, build_checkpoint(folder, request.param)


def test_float32_on_cuda_matches_transformers(checkpoint):
    folder, hf_model = checkpoint
    llm = LLM(str(folder), dtype="float32", device="cuda")
    assert llm.runner.kv_cache.k.is_cuda and next(llm.runner.model.parameters()).is_cuda
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts()], params)  # batched: the decode path
    for prompt, out in zip(random_prompts(), outputs):
        tokens, logprobs = hf_greedy(hf_model, prompt, NEW_TOKENS)
        assert out.outputs[0].token_ids == tokens
        for entry, ref in zip(out.outputs[0].logprobs, logprobs):
            values, ids = ref.topk(5)
            for token_id, value in zip(ids.tolist(), values.tolist()):
                assert abs(entry[token_id].logprob - value) < 2e-3


def test_bfloat16_on_cuda_tracks_float32(checkpoint):
    folder, _ = checkpoint
    reference = LLM(str(folder), dtype="float32", device="cuda")  # checked against transformers above
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)
    bf16 = LLM(str(folder), dtype="bfloat16", device="cuda")
    differences = []
    for prompt in random_prompts():
        expected = reference.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
        differences += assert_tracks_reference(bf16, prompt, expected, atol=0.2)
    assert sum(differences) / len(differences) < 0.05
