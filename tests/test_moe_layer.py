"""The MoE building blocks on their own: routers against transformers' router modules, the fast expert
path and its kernel against the reference, checkpoint expert mapping, yarn / interleaved RoPE, and MLA's cache size."""

from __future__ import annotations

import pytest
import torch

from ownllm.config import ModelConfig
from ownllm.layers.attention import KVCacheSpec
from ownllm.layers.mla import mla_kv_cache_spec
from ownllm.layers.moe import MOE_BACKENDS, ExpertTensors, Experts, grouped_sigmoid_topk, sigmoid_topk, softmax_topk
from ownllm.layers.rotary import InterleavedRotaryEmbedding, rope_attention_factor, rope_inv_freq

HIDDEN, NUM_EXPERTS = 32, 8


def hidden_states(num_tokens: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def same_routing(ours: tuple[torch.Tensor, torch.Tensor], theirs_weights: torch.Tensor, theirs_ids: torch.Tensor):
    """Same experts per token (in any order) with the same weights."""
    weights, ids = ours
    order, their_order = ids.argsort(dim=-1), theirs_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), theirs_ids.gather(1, their_order))
    torch.testing.assert_close(weights.gather(1, order), theirs_weights.float().gather(1, their_order))


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_router_matches_mixtral_and_qwen3(renormalize):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    router = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=NUM_EXPERTS, num_experts_per_tok=2,
                                               norm_topk_prob=renormalize))
    torch.nn.init.normal_(router.weight)
    x = hidden_states()
    _, weights, ids = router(x)
    same_routing(softmax_topk(x @ router.weight.T, 2, renormalize), weights, ids)


def test_sigmoid_router_matches_llama4():
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    router = Llama4Router(Llama4TextConfig(hidden_size=HIDDEN, num_local_experts=NUM_EXPERTS, num_experts_per_tok=1))
    torch.nn.init.normal_(router.weight)
    x = hidden_states()
    scores, logits = router(x)  # scores: [T, E], zero off the chosen expert
    weights, ids = sigmoid_topk(logits, 1)
    assert torch.equal(ids[:, 0], scores.argmax(dim=-1))
    torch.testing.assert_close(weights[:, 0], scores.max(dim=-1).values)


def deepseek_router(n_group: int = 4, topk_group: int = 2, top_k: int = 3):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=NUM_EXPERTS, n_group=n_group, topk_group=topk_group,
                              num_experts_per_tok=top_k, routed_scaling_factor=2.5, norm_topk_prob=True)
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight, std=0.3)
    torch.nn.init.normal_(router.e_score_correction_bias, std=0.2)
    return router


def test_grouped_router_matches_deepseek_v3():
    router = deepseek_router()
    x = hidden_states()
    logits, weights, ids = router(x)
    ours = grouped_sigmoid_topk(logits, 3, router.e_score_correction_bias, 4, 2, True, 2.5)
    same_routing(ours, weights, ids)


def test_group_limit_and_bias_change_the_choice_but_bias_not_the_weights():
    router = deepseek_router()
    logits = router(hidden_states(256))[0]
    bias = router.e_score_correction_bias
    limited = grouped_sigmoid_topk(logits, 3, bias, 4, 2, False, 1.0)[1].sort(dim=-1).values
    free = grouped_sigmoid_topk(logits, 3, bias, 1, 1, False, 1.0)[1].sort(dim=-1).values
    unbiased = grouped_sigmoid_topk(logits, 3, None, 4, 2, False, 1.0)[1].sort(dim=-1).values
    assert (limited != free).any(dim=-1).sum() > 0
    assert (limited != unbiased).any(dim=-1).sum() > 0
    weights, ids = grouped_sigmoid_topk(logits, 3, bias, 4, 2, False, 1.0)
    torch.testing.assert_close(weights, logits.sigmoid().gather(1, ids))


def random_experts(scale_input: bool = False, dtype=torch.float32, width: int = 24) -> Experts:
    with torch.device("meta"):
        experts = Experts(NUM_EXPERTS, HIDDEN, width, scale_input=scale_input)
    g = torch.Generator().manual_seed(1)
    for expert in experts.experts:
        for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
            linear.weight = torch.nn.Parameter(torch.randn(linear.weight.shape, generator=g).to(dtype) / 4)
    return experts


def run(experts: Experts, backend: str, x, weights, ids) -> torch.Tensor:
    return MOE_BACKENDS[backend].forward(experts, x, weights, ids)


@pytest.mark.parametrize("num_tokens", [1, 3, 40])
@pytest.mark.parametrize("scale_input", [False, True])
def test_fast_path_matches_reference(num_tokens, scale_input):
    experts = random_experts(scale_input)
    x = hidden_states(num_tokens)
    weights, ids = softmax_topk(hidden_states(num_tokens, seed=2)[:, :NUM_EXPERTS], 3, True)
    torch.testing.assert_close(run(experts, "fast", x, weights, ids), run(experts, "reference", x, weights, ids))


@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("scale_input", [False, True])
def test_fast_path_in_bfloat16_matches_reference(num_tokens, scale_input):
    experts = random_experts(scale_input, dtype=torch.bfloat16)
    x = hidden_states(num_tokens).bfloat16()
    weights, ids = softmax_topk(hidden_states(num_tokens, seed=2)[:, :NUM_EXPERTS], 2, True)
    torch.testing.assert_close(run(experts, "fast", x, weights, ids).float(),
                               run(experts, "reference", x, weights, ids).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("width", [24, 100])
def test_one_token_kernel_matches_the_torch_path(scale_input, width):
    """The bf16 kernel (kernels/moe_experts.cpp) against the per-op torch path it replaces, to bf16 rounding."""
    from ownllm.kernels.build import bf16_kernels, cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("no AVX-512 BF16 on this CPU")
    kernel = bf16_kernels("moe_experts")
    assert kernel is not None, "the kernel failed to build (see the log)"
    experts = random_experts(scale_input, dtype=torch.bfloat16, width=width)
    x = hidden_states(1, seed=3).bfloat16()
    weights, ids = torch.tensor([0.6, 0.3, 0.1]), [6, 1, 4]
    gate, up, down = ([ws[e] for e in ids] for ws in experts.per_expert())
    got = kernel.experts_one_token(x, gate, up, down, weights, scale_input).float()
    if scale_input:
        expected = sum(experts.experts[e]((x.float() * w).bfloat16()).float() for e, w in zip(ids, weights))
    else:
        expected = sum(experts.experts[e](x).float() * w for e, w in zip(ids, weights))
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
    assert got.abs().max() > 0.1  # a real signal, not zeros
    with pytest.raises(RuntimeError, match="weights must be contiguous bf16"):
        kernel.experts_one_token(x, [gate[0].t()], up[:1], down[:1], weights[:1], scale_input)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_reads_only_the_chosen_experts(dtype):
    """Poisoning every other expert's weights with NaN leaves one token's fast-path output finite and unchanged."""
    experts = random_experts(dtype=dtype)
    x = hidden_states(1).to(dtype)
    weights, ids = torch.tensor([[0.7, 0.3]]), torch.tensor([[5, 2]])
    expected = run(experts, "reference", x, weights, ids)
    for e in (e for e in range(NUM_EXPERTS) if e not in (5, 2)):
        for linear in (experts.experts[e].gate_proj, experts.experts[e].up_proj, experts.experts[e].down_proj):
            linear.weight.data.fill_(float("nan"))
    got = run(experts, "fast", x, weights, ids)
    assert got.isfinite().all()
    torch.testing.assert_close(got, expected)


def test_expert_tensors_rename_per_expert_weights_and_name_what_is_missing():
    tensors = {f"m.experts.{e}.{n}.weight": torch.full((4, 3) if n != "w2" else (3, 4), float(e))
               for e in range(2) for n in ("w1", "w3", "w2")}
    view = ExpertTensors(tensors, names=("w1", "w3", "w2"))
    assert view["m.experts.1.up_proj.weight"] is tensors["m.experts.1.w3.weight"]
    assert "m.experts.0.down_proj.weight" in view and "m.experts.2.down_proj.weight" not in view
    del tensors["m.experts.1.w3.weight"]
    with pytest.raises(ValueError, match=r"m\.experts\.1\.w3\.weight"):
        view["m.experts.1.up_proj.weight"]


def test_expert_tensors_view_fused_llama4_layout():
    gate_up, down = torch.randn(2, 3, 8), torch.randn(2, 4, 3)  # [E, H, 2I], [E, I, H]
    view = ExpertTensors({"p.x.experts.gate_up_proj": gate_up, "p.x.experts.down_proj": down},
                         rename=lambda n: "p." + n)
    assert torch.equal(view["x.experts.1.gate_proj.weight"], gate_up[1, :, :4].t())
    assert torch.equal(view["x.experts.1.up_proj.weight"], gate_up[1, :, 4:].t())
    assert torch.equal(view["x.experts.0.down_proj.weight"], down[0].t())
    assert view["x.experts.1.up_proj.weight"].data_ptr() == gate_up[1, 0, 4:].data_ptr()  # a view, not a copy
    assert "x.experts.2.gate_proj.weight" not in view  # 2 experts stored: a clear "missing", not an IndexError


def test_yarn_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
               "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}
    config = DeepseekV3Config(rope_parameters={**scaling, "rope_theta": 10000.0}, max_position_embeddings=163840)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    torch.testing.assert_close(rope_inv_freq(64, 10000.0, scaling), inv_freq)
    assert rope_attention_factor(scaling) == pytest.approx(attention_factor)


def test_interleaved_rope_matches_llama4_complex_form():
    from transformers.models.llama4.modeling_llama4 import apply_rotary_emb

    rope = InterleavedRotaryEmbedding(16, 500000.0, None)
    positions = torch.arange(7) * 5
    q, k = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    freqs = positions.float()[:, None] * rope.inv_freq[None, :]
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)[None]  # [1, T, 8]
    ref_q, ref_k = apply_rotary_emb(q[None], k[None], freqs_cis)
    ours_q, ours_k = rope(positions, q, k)
    torch.testing.assert_close(ours_q, ref_q[0])
    torch.testing.assert_close(ours_k, ref_k[0])


def test_mla_caches_576_values_per_token_and_layer():
    """DeepSeek-V3's shapes: the latent cache against the per-head keys and values transformers would expand."""
    hf = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168, num_hidden_layers=61,
              num_attention_heads=128, num_key_value_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
              qk_nope_head_dim=128, v_head_dim=128)
    config = ModelConfig.from_hf(hf, "bfloat16")
    spec = mla_kv_cache_spec(config)
    assert (spec.num_kv_heads, spec.head_dim, spec.v_head_dim) == (1, 576, 0)
    assert spec.bytes_per_token(torch.bfloat16) == 61 * 576 * 2 == 70_272
    expanded = KVCacheSpec(61, 128, 128 + 64, 128)  # every head's keys and values, as a GQA/MHA cache would hold
    assert expanded.bytes_per_token(torch.bfloat16) == 61 * 128 * 320 * 2 == 4_997_120


def test_quantized_checkpoints_are_refused_by_name():
    from ownllm.models.deepseek_v3 import DeepseekV3ForCausalLM

    hf = dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=64, hidden_size=32, num_hidden_layers=1,
              num_attention_heads=2, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
              q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="fp8 quantized weights are not supported for DeepseekV3ForCausalLM"):
        with torch.device("meta"):
            DeepseekV3ForCausalLM(ModelConfig.from_hf(hf))
