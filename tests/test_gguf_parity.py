"""GGUF files written from tiny checkpoints: ownllm's greedy tokens equal transformers' loading the same GGUF."""

from __future__ import annotations

import pytest
import torch

from ownllm import LLM, SamplingParams
from tests.checkpoints import assert_same_generations, build_checkpoint, hf_greedy, random_prompts
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


@pytest.mark.parametrize("arch, tied", [("LlamaForCausalLM", True), ("Qwen2ForCausalLM", False)])
def test_q8_0_kept_quantized_in_bfloat16_equals_dequantized(arch, tied, tmp_path, monkeypatch):
    """In bfloat16 a Q8_0 file's matrices and embedding stay the file's blocks (layers.quant.Q8Weight),
    multiplied by the Q8_0 kernel: the same tokens and logprobs as the weights dequantized to bf16 at load."""
    from ownllm.kernels.build import cpu_has_bf16
    from ownllm.layers.quant import Q8Weight

    if not cpu_has_bf16():
        pytest.skip("the Q8_0 kernel needs AVX-512 BF16")
    build_checkpoint(tmp_path / "hf", arch, hidden_size=128, intermediate_size=256, tie_word_embeddings=tied)
    path = write_gguf(tmp_path / "hf", tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, logprobs=5)

    def run(llm):
        return [llm.generate(prompt, params)[0].outputs[0] for prompt in random_prompts()]  # 40 tokens: prefill path

    kept = LLM(str(path), dtype="bfloat16")
    model = kept.runner.model
    assert model.model.embed_tokens.weight is None and isinstance(model.model.embed_tokens.quantized, Q8Weight)
    assert isinstance(model.lm_head.packed, Q8Weight) and isinstance(model.model.layers[0].mlp.down_proj.packed, Q8Weight)
    ours = run(kept)
    with monkeypatch.context() as m:
        m.setattr(Q8Weight, "runs_here", staticmethod(lambda dtype: False))
        dequantized = LLM(str(path), dtype="bfloat16")
        assert dequantized.runner.model.lm_head.weight.dtype == torch.bfloat16
        expected = run(dequantized)
    assert_same_generations(ours, expected, atol=2e-2)
