"""GGUF files written from tiny checkpoints: ownllm's greedy tokens equal transformers' loading the same GGUF."""

from __future__ import annotations

import pytest
import torch

from ownllm import LLM, SamplingParams
from tests.checkpoints import (assert_same_generations, assert_tracks_reference, build_checkpoint, eight_bit_bounds,
                               hf_greedy, random_prompts)
from tests.gguf_writer import quantize_with_llama_cpp, write_gguf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' from_pretrained(gguf_file=...) needs it

CASES = [("LlamaForCausalLM", "F32"), ("LlamaForCausalLM", "F16"), ("LlamaForCausalLM", "Q8_0"),
         ("Qwen2ForCausalLM", "Q8_0"), ("LlamaForCausalLM", "Q4_K_M"), ("Qwen2ForCausalLM", "Q5_K_M"),
         ("LlamaForCausalLM", "Q3_K_M")]


def tiny_gguf(folder, arch: str, qtype: str, **overrides):
    """A tiny random checkpoint of `arch` saved under folder/hf, as a GGUF of `qtype`: written by our writer
    (F32, F16, BF16, Q8_0), or by llama.cpp's quantizer from the F32 file (K-quant mixes such as Q4_K_M)."""
    # K-quants need rows of 256k weights (llama.cpp falls back to Q5_0 / Q8_0 otherwise), Q8_0 of 32k
    build_checkpoint(folder / "hf", arch, **{"hidden_size": 256, "intermediate_size": 512, **overrides})
    if "_K" not in qtype:
        return write_gguf(folder / "hf", folder / f"tiny-{qtype}.gguf", qtype)
    return quantize_with_llama_cpp(write_gguf(folder / "hf", folder / "tiny-F32.gguf"), folder / f"tiny-{qtype}.gguf", qtype)


@pytest.mark.parametrize("arch, qtype", CASES)
def test_gguf_greedy_matches_transformers_on_same_file(arch, qtype, tmp_path):
    path = tiny_gguf(tmp_path, arch, qtype)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", quant_method="dequantized")  # the model code (kernels: below)
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32, logprobs=5)
    for prompt in random_prompts():
        ours = llm.generate(prompt, params)[0].outputs[0]
        tokens, logprobs = hf_greedy(reference, prompt, 32)
        assert ours.token_ids == tokens
        for entry, ref in zip(ours.logprobs, logprobs):
            values, ids = ref.topk(5)
            for token_id, value in zip(ids.tolist(), values.tolist()):
                assert abs(entry[token_id].logprob - value) < 1e-3


@pytest.mark.parametrize("arch, qtype, tied", [("LlamaForCausalLM", "Q8_0", True), ("Qwen2ForCausalLM", "Q8_0", False),
                                               ("LlamaForCausalLM", "Q4_K_M", False), ("Qwen2ForCausalLM", "Q4_K_M", True)])
def test_block_quantized_kept_in_bfloat16(arch, qtype, tied, tmp_path, monkeypatch):
    """In bfloat16 a Q8_0 or K-quant file's matrices and embedding stay the file's blocks
    (layers.quant.BlockWeight), multiplied by the block kernels. Q8_0 by the float kernel: the same tokens and
    logprobs as the weights dequantized to bf16 at load (the kernel is bit-equal to that). Either, with the
    integer kernels where the CPU has VNNI (activations rounded to 8 bits, as llama.cpp does: Q8_0 at decode,
    K-quants at prefill too): teacher-forced along the float32 load's greedy run, within what bf16 and 8-bit
    activations move it (eight_bit_bounds: for K-quants, derived from llama.cpp's own move on the same file). Q4_K_M mixes Q4_K and Q6_K, so some projections cannot be fused. The dequantized
    reference is the same file loaded with quant_method="dequantized"."""
    from gguf import GGMLQuantizationType as QType

    import ownllm.layers.quant as quant
    from ownllm.kernels.build import cpu_has_bf16
    from ownllm.layers.quant import BlockWeight

    if not cpu_has_bf16():
        pytest.skip("the block kernels need AVX-512 BF16")
    path = tiny_gguf(tmp_path, arch, qtype, tie_word_embeddings=tied)
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, logprobs=5)

    def run(llm):
        return [llm.generate(prompt, params)[0].outputs[0] for prompt in random_prompts()]  # 40 tokens: prefill path

    kept = LLM(str(path), dtype="bfloat16")
    model = kept.runner.model
    embedding = model.model.embed_tokens
    assert embedding.weight is None and isinstance(embedding.quantized, BlockWeight)
    held = [model.lm_head.packed] + [m.packed for m in model.modules() if getattr(m, "packed", None) is not None]
    assert all(isinstance(weight, BlockWeight) for weight in held)
    assert {weight.qtype for weight in held} == ({QType.Q8_0} if qtype == "Q8_0" else {QType.Q4_K, QType.Q6_K})
    references = run(LLM(str(path), dtype="float32", quant_method="dequantized"))
    if qtype == "Q8_0":  # prompts on bf16 activations, which alone move these random models' logprobs by up
        mean_bound, atol = 0.05, 0.2  # to 0.14 (mean 0.02-0.03), measured with the weights dequantized to bf16
    else:  # K-quant prompts on 8-bit activations too: Llama 0.055 (llama.cpp 0.051), Qwen2 0.058 (0.051)
        mean_bound, atol = eight_bit_bounds(path, random_prompts(), references, monkeypatch)
    differences = [d for prompt, reference in zip(random_prompts(), references)
                   for d in assert_tracks_reference(kept, prompt, reference, atol=atol)]
    assert sum(differences) / len(differences) < mean_bound
    if qtype == "Q8_0":
        monkeypatch.setattr(quant, "VNNI_MAX_ROWS", {})  # the float kernel only
        dequantized = LLM(str(path), dtype="bfloat16", quant_method="dequantized")
        assert dequantized.runner.model.lm_head.weight.dtype == torch.bfloat16
        assert not any(getattr(m, "packed", None) is not None for m in dequantized.runner.model.modules())
        assert_same_generations(run(LLM(str(path), dtype="bfloat16")), run(dequantized), atol=2e-2)  # fresh caches


def test_k_quant_mix_with_fallback_types(tmp_path, monkeypatch):
    """Q4_K_M of a model whose rows are not multiples of 256 weights (hidden 160, as SmolLM2's 576 or
    Qwen2.5-0.5B's 896): llama.cpp stores those matrices as Q5_0 (and Q8_0); they load and stay quantized
    too, teacher-forced along the float32 load within what bf16 and 8-bit activations move it (eight_bit_bounds:
    0.025 against a bound of 0.055 when measured)."""
    from gguf import GGMLQuantizationType as QType

    from ownllm.kernels.build import cpu_has_bf16
    from ownllm.layers.quant import BlockWeight

    path = tiny_gguf(tmp_path, "LlamaForCausalLM", "Q4_K_M", hidden_size=160, intermediate_size=512, head_dim=40)
    reference = LLM(str(path), dtype="float32", quant_method="dequantized")
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, logprobs=5)
    expected = [reference.generate(prompt, params)[0].outputs[0] for prompt in random_prompts()]
    if not cpu_has_bf16():
        pytest.skip("the bfloat16 kernels need AVX-512 BF16 (float32 on AVX2: test_block_quantized_kept_in_float32)")
    kept = LLM(str(path), dtype="bfloat16")
    held = {m.packed.qtype for m in kept.runner.model.modules() if isinstance(getattr(m, "packed", None), BlockWeight)}
    assert QType.Q5_0 in held
    mean_bound, atol = eight_bit_bounds(path, random_prompts(), expected, monkeypatch)
    differences = [d for prompt, reference_output in zip(random_prompts(), expected)
                   for d in assert_tracks_reference(kept, prompt, reference_output, atol=atol)]
    assert sum(differences) / len(differences) < mean_bound


@pytest.mark.parametrize("arch, qtype, overrides", [
    ("LlamaForCausalLM", "Q8_0", {}), ("LlamaForCausalLM", "Q4_K_M", {}), ("Qwen2ForCausalLM", "Q5_K_M", {}),
    ("LlamaForCausalLM", "Q4_K_M", {"hidden_size": 160, "intermediate_size": 512, "head_dim": 40})])
def test_block_quantized_kept_in_float32(arch, qtype, overrides, tmp_path, monkeypatch):
    """On CPUs without AVX-512 (forced here where the CPU has it) a quantized file computes in float32 with its
    weights repacked for kernels/x16_avx2.cpp (layers/quant_avx2.py), activations rounded to 8 bits as
    llama.cpp's CPU kernels round them: teacher-forced along the dequantized float32 load's greedy run, it stays
    about as close as llama.cpp on the same file. Both round the same float32 activations, independently (ours in
    blocks of 32 or 16, llama.cpp's K-quant dot products in blocks of 256), so the mean move is allowed a quarter
    more than llama.cpp's, and any one step twice llama.cpp's largest. Measured (ours / llama.cpp, mean and max):
    Llama Q8_0 0.025 / 0.026, 0.117 / 0.084; Llama Q4_K_M 0.041 / 0.051, 0.191 / 0.193; Qwen2 Q5_K_M 0.038 /
    0.056, 0.159 / 0.256; hidden 160 (Q5_0 and Q8_0 fallbacks) 0.028 / 0.038, 0.088 / 0.109."""
    import ownllm.layers.quant_avx2 as quant_avx2
    from ownllm.kernels.build import cpu_has_avx2
    from ownllm.layers.quant_avx2 import X16Weight
    from tests.checkpoints import llama_cpp_forced_differences

    if not cpu_has_avx2():
        pytest.skip("x16_avx2 needs AVX2 and FMA")
    monkeypatch.setattr(quant_avx2, "cpu_has_bf16", lambda: False)
    path = tiny_gguf(tmp_path, arch, qtype, **overrides)
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, logprobs=5)
    reference = LLM(str(path), dtype="float32", quant_method="dequantized")
    references = [reference.generate(prompt, params)[0].outputs[0] for prompt in random_prompts()]
    kept = LLM(str(path), dtype="float32")
    held = [m.packed for m in kept.runner.model.modules() if getattr(m, "packed", None) is not None]
    assert held and all(isinstance(weight, X16Weight) for weight in held)
    assert kept.runner.model.model.embed_tokens.quantized is not None  # looked up row by row, in float32
    llama = llama_cpp_forced_differences(path, random_prompts(), references)
    differences = [d for prompt, reference_output in zip(random_prompts(), references)
                   for d in assert_tracks_reference(kept, prompt, reference_output, atol=2 * max(llama))]
    assert sum(differences) / len(differences) < 1.25 * sum(llama) / len(llama)
