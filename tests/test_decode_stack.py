"""The decode step as one C++ call (layers/decode_stack.py) against the Python layers it replaces: the same bits."""

from __future__ import annotations

import pytest
import torch

from ownllm import LLM, SamplingParams
from ownllm.kernels.build import GEMV_MAX_ROWS, decode_ops
from ownllm.layers.attention import ATTENTION_BACKENDS, AttentionMetadata, PagedKVCache
from ownllm.layers.decode_stack import DecodeStack
from ownllm.worker.input_batch import Span, build_inputs
from tests.checkpoints import build_checkpoint, random_prompts
from tests.gguf_writer import write_gguf
from tests.kernel_modules import built_kernel

VARIANTS = {  # architecture, config overrides: biases, qk-norm, a sliding window, head sizes the kernels special-case
    "llama": ("LlamaForCausalLM", {}),
    "llama-head64": ("LlamaForCausalLM", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1)),
    "qwen2-bias": ("Qwen2ForCausalLM", {}),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", dict(head_dim=32)),
    "mistral-window": ("MistralForCausalLM", dict(sliding_window=8)),
    "gguf-q8_0": ("LlamaForCausalLM", {}),  # quantized projections: called back from the kernel
    "bundled-q4_1": (None, {}),  # the bundled SmolLM2-135M-Instruct, 30 layers of Q4_1 projections
}


@pytest.fixture(scope="module")
def ops():
    return built_kernel(lambda: decode_ops(torch.zeros(1, dtype=torch.bfloat16)), "the bf16 decode ops")


@pytest.fixture(scope="module", params=list(VARIANTS))
def llm(request, tmp_path_factory, ops):
    arch, overrides = VARIANTS[request.param]
    if arch is None:
        return LLM(enable_prefix_caching=False)
    folder = tmp_path_factory.mktemp(request.param)
    build_checkpoint(folder, arch, num_hidden_layers=3, **overrides)
    if request.param.startswith("gguf"):
        return LLM(str(write_gguf(folder, folder / "model.gguf", "Q8_0")), enable_prefix_caching=False)
    return LLM(str(folder), dtype="bfloat16", enable_prefix_caching=False)


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
    quantized = [p.weight is None for layer in model.model.layers
                 for p in (layer.self_attn.qkv_proj, layer.mlp.down_proj)]
    assert all(quantized) if str(llm.model_path).endswith(".gguf") else not any(quantized)
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
    assert LLM(str(folder), dtype="float32", enable_prefix_caching=False).runner.model.decode_stack is None
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
