"""GGUF files written from tiny checkpoints: ownllm's greedy tokens equal transformers' loading the same GGUF."""

from __future__ import annotations

import pytest
import torch

from ownllm import LLM, SamplingParams
from tests.checkpoints import build_checkpoint, hf_greedy, random_prompts
from tests.gguf_writer import write_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' from_pretrained(gguf_file=...) needs it

CASES = [("LlamaForCausalLM", "F32"), ("LlamaForCausalLM", "F16"), ("LlamaForCausalLM", "Q8_0"),
         ("Qwen2ForCausalLM", "Q8_0")]


@pytest.mark.parametrize("arch, qtype", CASES)
def test_gguf_greedy_matches_transformers_on_same_file(arch, qtype, tmp_path):
    build_checkpoint(tmp_path / "hf", arch, hidden_size=128, intermediate_size=256)  # Q8_0 needs rows of 32k
    path = write_gguf(tmp_path / "hf", tmp_path / f"tiny-{qtype}.gguf", qtype)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32, logprobs=5)
    for prompt in random_prompts():
        ours = llm.generate(prompt, params)[0].outputs[0]
        tokens, logprobs = hf_greedy(reference, prompt, 32)
        assert ours.token_ids == tokens
        for entry, ref in zip(ours.logprobs, logprobs):
            values, ids = ref.topk(5)
            for token_id, value in zip(ids.tolist(), values.tolist()):
                assert abs(entry[token_id].logprob - value) < 1e-3
