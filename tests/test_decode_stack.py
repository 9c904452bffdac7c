"""The decode step as one C++ call (layers/decode_stack.py) against the Python layers it replaces: the same bits, in
bfloat16 (decode_ops.cpp, AVX-512 BF16) and in float32 (decode_f32.cpp, AVX2: run on AVX-512 CPUs too)."""

from __future__ import annotations

import pytest
import torch

from ownllm import LLM, SamplingParams
from ownllm.kernels.build import GEMV_MAX_ROWS, avx2_kernels, cpu_has_avx2, decode_ops
from ownllm.layers import quant_avx2
from ownllm.layers.attention import ATTENTION_BACKENDS, AttentionMetadata, PagedKVCache
from ownllm.layers.decode_stack import DecodeStack
from ownllm.layers.linear import Linear
from ownllm.layers.norm import RMSNorm
from ownllm.layers.quant_avx2 import X16Weight
from ownllm.worker.input_batch import Span, build_inputs
from tests.checkpoints import build_checkpoint, random_prompts
from tests.gguf_writer import quantize_with_llama_cpp, write_gguf
from tests.kernel_modules import built_kernel

VARIANTS = {  # architecture, config overrides: biases, qk-norm, a sliding window, head sizes the kernels special-case
    "llama": ("LlamaForCausalLM", {}),
    "llama-head64": ("LlamaForCausalLM", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1)),
    "qwen2-bias": ("Qwen2ForCausalLM", {}),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", dict(head_dim=32)),
    "mistral-window": ("MistralForCausalLM", dict(sliding_window=8)),
    "gguf-q8_0": ("LlamaForCausalLM", {}),  # quantized projections: called back from the kernel
    "bundled-q4_1": (None, {}),  # the bundled SmolLM2-135M-Instruct, 30 layers of Q4_1 projections
    # float32 (dense weights: at::linear; GGUF blocks kept quantized: x16_avx2's integer kernels)
    "f32-llama": ("LlamaForCausalLM", {}),
    "f32-qwen2-bias": ("Qwen2ForCausalLM", {}),
    "f32-qwen3-qk-norm": ("Qwen3ForCausalLM", dict(head_dim=32)),
    "f32-mistral-window": ("MistralForCausalLM", dict(sliding_window=8)),
    "f32-gguf-q8_0": ("LlamaForCausalLM", {}),
    "f32-gguf-qwen2-q4_k_m": ("Qwen2ForCausalLM", dict(hidden_size=256, intermediate_size=512)),  # mixed: unfused
    "f32-bundled-q4_1": (None, {}),
    # 16-bit checkpoints under float32 compute: their weights kept 16-bit (half_avx2)
    "f32-half-llama-bf16": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "f32-half-qwen2-f16": ("Qwen2ForCausalLM", {}),
}


@pytest.fixture(scope="module")
def ops():
    return built_kernel(lambda: decode_ops(torch.zeros(1, dtype=torch.bfloat16)), "the bf16 decode ops")


@pytest.fixture(scope="module")
def f32_ops():
    if not cpu_has_avx2():
        pytest.skip("decode_f32 needs AVX2 and FMA")
    assert avx2_kernels("decode_f32") is not None, "decode_f32 failed to build (see the log)"


@pytest.fixture(scope="module", params=list(VARIANTS))
def llm(request, tmp_path_factory):
    name = request.param
    f32 = name.startswith("f32-")
    request.getfixturevalue("f32_ops" if f32 else "ops")
    arch, overrides = VARIANTS[name]
    with pytest.MonkeyPatch.context() as patch:
        # float32: GGUF blocks kept quantized (x16_avx2) and cpu_float32 attention, as on CPUs without AVX-512
        patch.setattr(quant_avx2, "cpu_has_bf16", lambda: False)
        options = dict(dtype="float32", attention_backend="cpu_float32") if f32 else {}
        if arch is None:
            return LLM(enable_prefix_caching=False, **options)
        folder = tmp_path_factory.mktemp(name)
        hf_model = build_checkpoint(folder, arch, num_hidden_layers=3, **overrides)
        if "half" in name:  # saved 16-bit, loaded in the checkpoint's dtype
            hf_model.to(torch.float16 if name.endswith("f16") else torch.bfloat16).save_pretrained(folder)
            return LLM(str(folder), enable_prefix_caching=False, attention_backend="cpu_float32")
        if "q4_k_m" in name:
            path = quantize_with_llama_cpp(write_gguf(folder, folder / "f32.gguf"), folder / "model.gguf", "Q4_K_M")
            return LLM(str(path), enable_prefix_caching=False, **options)
        if "gguf" in name:
            return LLM(str(write_gguf(folder, folder / "model.gguf", "Q8_0")), enable_prefix_caching=False, **options)
        return LLM(str(folder), enable_prefix_caching=False, **(options or dict(dtype="bfloat16")))


class Calls:
    """Counts the stack's calls and runs each step both ways: the stack, then the Python layers on the same
    inputs (rewriting the same cache slots with the same values), asserting the same bits."""

    def __init__(self, model) -> None:
        self.model, self.stack, self.calls, self.batched = model, model.decode_stack, 0, 0

    def __call__(self, x, meta):
        self.calls += 1
        fused = self.stack(x, meta)
        self.model.decode_stack = None
        try:
            layers = self.model.hidden_states(None, meta, inputs_embeds=x)
        finally:
            self.model.decode_stack = self
        assert torch.equal(fused, layers), f"step {self.calls}: the stack differs from the layers"
        if x.shape[0] > 1:  # batch invariance: each row alone gets the same bits
            self.batched += 1
            for i in range(x.shape[0]):
                row = AttentionMetadata(meta.positions[i:i + 1], meta.slot_mapping[i:i + 1], [0, 1],
                                        [meta.seq_lens[i]], meta.block_tables[i:i + 1], meta.kv_cache, meta.backend)
                assert torch.equal(self.stack(x[i:i + 1], row), fused[i:i + 1]), f"step {self.calls}, row {i}"
        return fused

    def applies(self, x, meta):
        return self.stack.applies(x, meta)


def test_stack_matches_the_layers_bit_for_bit_in_every_batch(llm):
    model = llm.runner.model
    assert isinstance(model.decode_stack, DecodeStack)
    quantized = [p.weight is None for layer in model.model.layers for p in layer.modules() if isinstance(p, Linear)]
    assert all(quantized) if str(llm.model_path).endswith(".gguf") else not any(quantized)
    if "half" in str(llm.model_path):
        assert all(p.weight.dtype in (torch.bfloat16, torch.float16) for layer in model.model.layers
                   for p in layer.modules() if isinstance(p, Linear))  # multiplied by half_avx2 inside the stack
    if model.decode_stack.dtype == torch.float32 and quantized[0]:
        assert all(isinstance(p.packed, X16Weight) for layer in model.model.layers for p in layer.modules()
                   if isinstance(p, Linear))  # multiplied by x16_avx2 inside the stack
    calls = Calls(model)
    model.decode_stack = calls
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
        prompts = random_prompts(lengths=(5, 17, 40, 9))
        together = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        alone = [llm.generate([{"prompt_token_ids": p}], params)[0] for p in prompts]
    finally:
        model.decode_stack = calls.stack
    assert calls.calls >= 4 * 11  # every decode step ran through it
    assert calls.batched >= 11  # and the batches' rows were checked alone
    assert all(len(out.outputs[0].token_ids) == 12 for out in together + alone)


def test_stack_only_where_it_computes_what_the_layers_do(tmp_path, ops):
    folder = tmp_path / "llama"
    build_checkpoint(folder, "LlamaForCausalLM", num_hidden_layers=2)
    assert LLM(str(folder), dtype="float16", enable_prefix_caching=False).runner.model.decode_stack is None
    model = LLM(str(folder), dtype="bfloat16", enable_prefix_caching=False).runner.model
    stack = model.decode_stack
    pool = PagedKVCache(type(model).kv_cache_spec(model.config), 64, 16, torch.bfloat16)

    def applies(spans, backend=None):
        ids, meta = build_inputs(spans, pool, backend, "cpu")
        return stack.applies(model.embed_input_ids(ids), meta)

    decode = [Span([7], 20, [0, 1])]
    assert applies(decode)
    assert applies([Span([7], 20, [2 * i, 2 * i + 1]) for i in range(GEMV_MAX_ROWS)])
    assert not applies([Span([7], 20, [2 * i, 2 * i + 1]) for i in range(GEMV_MAX_ROWS + 1)])  # oneDNN's batch
    assert not applies([Span([1, 2, 3], 0, [0])])  # a prompt
    assert not applies(decode, ATTENTION_BACKENDS["torch"])  # the reference backend asked for


def test_float32_stack_only_with_its_attention_backend(tmp_path, f32_ops):
    """float32: any number of decode rows (the integer kernels and the attention take any), with cpu_float32
    attention only (the default on AVX2 CPUs without AVX-512); prompts and the reference backend run the layers."""
    folder = tmp_path / "llama"
    build_checkpoint(folder, "LlamaForCausalLM", num_hidden_layers=2)
    model = LLM(str(folder), dtype="float32", enable_prefix_caching=False).runner.model
    stack = model.decode_stack
    assert stack is not None and stack.dtype == torch.float32
    pool = PagedKVCache(type(model).kv_cache_spec(model.config), 128, 16, torch.float32)

    def applies(spans, backend):
        ids, meta = build_inputs(spans, pool, ATTENTION_BACKENDS[backend], "cpu")
        return stack.applies(model.embed_input_ids(ids), meta)

    assert applies([Span([7], 20, [2 * i, 2 * i + 1]) for i in range(GEMV_MAX_ROWS + 1)], "cpu_float32")
    assert not applies([Span([1, 2, 3], 0, [0])], "cpu_float32")  # a prompt
    assert not applies([Span([7], 20, [0, 1])], "torch")
    assert not applies([Span([7], 20, [0, 1])], "cpu_kernels")


@pytest.mark.parametrize("dim", [576, 896, 64, 40, 13])
def test_float32_rms_norm_is_the_layers_bit_for_bit(f32_ops, dim):
    """The stack's RMSNorm (torch's float32 steps, its sum by at::sum) against RMSNorm itself: equal bits, for rows
    alone and together, strided rows (a head's view of a projection's output), every scale."""
    torch.manual_seed(dim)
    norm = RMSNorm(dim, 1e-6)
    norm.weight.data = torch.randn(dim)
    kernel = avx2_kernels("decode_f32").rms_norm_f32
    for scale in (1e-3, 1.0, 40.0):
        x = torch.randn(17, 2 * dim) * scale * torch.rand(17, 1)
        rows = x[:, :dim]  # row stride 2 * dim
        expected = norm(rows)
        assert torch.equal(kernel(rows, norm.weight, norm.eps), expected)
        assert torch.equal(kernel(rows[5:6], norm.weight, norm.eps), expected[5:6])
