"""16-bit weights under float32 compute (kernels/half_avx2.cpp, layers/linear.py, ModelConfig.weight_dtype): the
kernel against float64 references (within the rounding of float32 sums, exactly where the sums are exact), each row
the same alone as in a batch; then bfloat16 and float16 checkpoints loaded on a CPU without AVX-512 BF16 (forced on
one that has it): float32 compute, the Linear weights and the token embedding kept 16-bit, greedy tokens and top-5
logprobs as transformers' float32 run of the same files (safetensors folders and F16 / BF16 GGUF files). Runs on
every CPU with AVX2, FMA and F16C."""

from __future__ import annotations

import pytest
import torch
import transformers

from ownllm import LLM, SamplingParams
from ownllm.kernels.build import avx2_kernels, cpu_has_avx2
from ownllm.layers import quant_avx2
from ownllm.layers.embedding import Embedding
from ownllm.layers.linear import Linear
from tests.checkpoints import (assert_matches_reference, build_bert_checkpoint, build_checkpoint, hf_greedy,
                               random_prompts)
from tests.gguf_writer import write_gguf

HALVES = [torch.bfloat16, torch.float16]
U = 2.0**-24  # float32's unit roundoff


@pytest.fixture(scope="module")
def kernel():
    if not cpu_has_avx2():
        pytest.skip("half_avx2 needs AVX2, FMA and F16C")
    module = avx2_kernels("half_avx2")
    assert module is not None, "half_avx2 failed to build (see the log)"
    return module


def float32_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[M, N]: how far a float32 sum of x . w (one chain of FMAs over K / 8 steps, then 3 additions of lanes, then
    the K % 8 tail) may be from the exact one: (steps + 3) u sum |x w|, u float32's unit roundoff."""
    K = x.shape[1]
    steps = K // 8 + 3 + K % 8 + 1
    return 1.01 * steps * U * (x.abs().double() @ weight.abs().double().T)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("M,N,K", [(1, 577, 576), (2, 49, 64), (3, 24, 8), (4, 7, 9), (5, 100, 1003), (9, 130, 72),
                                   (17, 33, 40), (33, 25, 256)])
def test_within_float32_rounding_of_the_exact_product(kernel, dtype, M, N, K):
    torch.manual_seed(M * N + K)
    x, weight, bias = torch.randn(M, K), torch.randn(N, K).to(dtype), torch.randn(N)
    exact = x.double() @ weight.double().T  # the weights widen exactly
    for b in (None, bias):
        out = kernel.half_matmul_avx2(x, weight, b)
        assert out.dtype == torch.float32 and out.shape == (M, N)
        reference = exact if b is None else exact + b.double()
        error = (out.double() - reference).abs()
        assert (error <= float32_bound(x, weight) + (0 if b is None else U * reference.abs())).all()


@pytest.mark.parametrize("dtype", HALVES)
def test_exact_where_the_sums_are(kernel, dtype):
    """Small integers: every product and sum is exact in float32, so any slip in widening a weight shows."""
    torch.manual_seed(0)
    x = torch.randint(-8, 9, (6, 203)).float()
    weight = torch.randint(-8, 9, (29, 203)).to(dtype)
    weight[0, :16] = torch.tensor([0.5, -0.25, 1.5, 3.0, -7.5, 0.125, 2.0, -1.0] * 2)  # fractions widen exactly too
    assert torch.equal(kernel.half_matmul_avx2(x, weight, None), (x.double() @ weight.double().T).float())


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("M", [2, 5, 9, 33])
def test_each_row_the_same_alone_as_in_a_batch(kernel, dtype, M):
    torch.manual_seed(M)
    x, weight, bias = torch.randn(M, 300), torch.randn(75, 300).to(dtype), torch.randn(75)
    together = kernel.half_matmul_avx2(x, weight, bias)
    alone = torch.cat([kernel.half_matmul_avx2(x[i:i + 1], weight, bias) for i in range(M)])
    assert torch.equal(together, alone)


def test_refuses_what_it_cannot_multiply(kernel):
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        kernel.half_matmul_avx2(torch.randn(2, 8), torch.randn(3, 8), None)
    with pytest.raises(RuntimeError, match="K = 8"):
        kernel.half_matmul_avx2(torch.randn(2, 9), torch.randn(3, 8).bfloat16(), None)
    with pytest.raises(RuntimeError, match="bias"):
        kernel.half_matmul_avx2(torch.randn(2, 8), torch.randn(3, 8).bfloat16(), torch.randn(4))


@pytest.fixture
def without_bf16(monkeypatch, kernel):
    """As on a CPU without AVX-512 BF16 (where this machine has it)."""
    monkeypatch.setattr(quant_avx2, "cpu_has_bf16", lambda: False)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("arch,overrides", [("LlamaForCausalLM", dict(tie_word_embeddings=True)),
                                            ("Qwen2ForCausalLM", {}), ("Qwen3ForCausalLM", dict(head_dim=32))])
def test_16_bit_checkpoint_computes_in_float32_as_transformers(tmp_path, without_bf16, dtype, arch, overrides):
    build_checkpoint(tmp_path, arch, **overrides).to(dtype).save_pretrained(tmp_path, safe_serialization=True)
    reference = getattr(transformers, arch).from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    llm = LLM(str(tmp_path))
    config, model = llm.config, llm.runner.model
    assert (config.dtype, config.weight_dtype) == ("float32", str(dtype).removeprefix("torch."))
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.dtype == dtype for m in linears)
    assert model.model.embed_tokens.weight.dtype == dtype and model.model.norm.weight.dtype == torch.float32
    if overrides.get("tie_word_embeddings"):  # one table, looked up and multiplied 16-bit
        assert model.lm_head.weight is model.model.embed_tokens.weight
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, logprobs=5)
    prompts = random_prompts()
    for prompt, output in zip(prompts, llm.generate(prompts, params)):
        ours = output.outputs[0]
        assert_matches_reference(ours.token_ids, ours.logprobs, hf_greedy(reference, prompt, 24))


@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_16_bit_gguf_file_too(tmp_path, without_bf16, qtype):
    """A GGUF file of F16 (or BF16) matrices: the same, its weights views of the file."""
    dtype = torch.float16 if qtype == "F16" else torch.bfloat16
    build_checkpoint(tmp_path, "LlamaForCausalLM").to(dtype).save_pretrained(tmp_path, safe_serialization=True)
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    llm = LLM(str(write_gguf(tmp_path, tmp_path / "model.gguf", qtype)))
    assert (llm.config.dtype, llm.config.weight_dtype) == ("float32", str(dtype).removeprefix("torch."))
    assert all(m.weight.dtype == dtype for m in llm.runner.model.modules() if isinstance(m, Linear))
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, logprobs=5)
    prompts = random_prompts()
    for prompt, output in zip(prompts, llm.generate(prompts, params)):
        ours = output.outputs[0]
        assert_matches_reference(ours.token_ids, ours.logprobs, hf_greedy(reference, prompt, 24))


def test_explicit_float32_widens_every_weight(tmp_path, without_bf16):
    build_checkpoint(tmp_path, "LlamaForCausalLM").to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    llm = LLM(str(tmp_path), dtype="float32")
    assert (llm.config.dtype, llm.config.weight_dtype) == ("float32", None)
    model = llm.runner.model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(m.lookup_dtype is None for m in model.modules() if isinstance(m, Embedding))


def test_16_bit_encoder_embeds_as_when_widened_at_load(tmp_path, without_bf16):
    """A bfloat16 BERT folder (sentence-transformers): its Linear weights and embedding tables kept 16-bit, the
    embeddings as the float32 load's, within float32 rounding."""
    build_bert_checkpoint(tmp_path).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    half, widened = LLM(str(tmp_path)), LLM(str(tmp_path), dtype="float32")
    assert (half.config.dtype, half.config.weight_dtype) == ("float32", "bfloat16")
    texts = ["hello world", "the quick brown fox jumps over the lazy dog"]
    ours = torch.tensor([out.embedding for out in half.embed(texts)])
    reference = torch.tensor([out.embedding for out in widened.embed(texts)])
    assert torch.allclose(ours, reference, rtol=0, atol=1e-6)
