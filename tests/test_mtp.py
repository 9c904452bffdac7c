"""DeepSeek-V3's multi-token-prediction layer as a draft ({"method": "mtp"}) on tiny random checkpoints in float32.

transformers saves no MTP layer, so the fixtures write its tensors (`model.layers.<num_hidden_layers>.*`) into the
safetensors file. The layer's forward matches a reference written here from its formulas around transformers'
decoder layer; greedy decoding with mtp speculation gives token for token what decoding without it gives, with
some drafts accepted and some rejected; a model without the layer is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ownllm import LLM
from ownllm.worker.input_batch import Span, build_inputs
from tests.checkpoints import BASE, random_prompts, save_tiny_tokenizer
from tests.test_spec_decode import acceptance, assert_same, completions, mixed_params, repetitive_prompts

DEEPSEEK = dict(num_hidden_layers=1, num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2,
                num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=16,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, moe_intermediate_size=32,
                num_nextn_predict_layers=1, max_position_embeddings=256)
SPEC = {"method": "mtp", "num_speculative_tokens": 3}


@pytest.fixture(autouse=True)
def fixed_draft_cost(monkeypatch):
    """An MTP draft costs a fixed 0.1 of a target step here (the one-layer target costs about what its MTP layer
    does, which would stop drafting), so how many tokens each step drafts does not depend on the machine's load."""
    from ownllm.spec_decode.mtp import MTPProposer

    monkeypatch.setattr(MTPProposer, "cost_per_draft", lambda self, step_seconds: 0.1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def save_deepseek(folder, mtp: str | None, seed: int = 0):
    """A one-layer DeepSeek-V3 (MoE) saved by transformers, plus an MTP layer: mtp "copy" makes it the target's
    own layer 0 behind an identity eh_proj on the embedding (rows of unit RMS, so enorm keeps them), a draft that
    is often right; "random" gives it weights of its own and leaves out its embed_tokens and shared_head.head
    (read from the target instead); None writes none. -> the transformers model."""
    import transformers

    config = transformers.DeepseekV3Config(**{**BASE, **DEEPSEEK})
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed /= embed.pow(2).mean(-1, keepdim=True).sqrt()
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder)
    if mtp is None:
        return model
    hidden = config.hidden_size
    tensors = load_file(folder / "model.safetensors")
    if mtp == "copy":
        block = {k.removeprefix("model.layers.0."): v for k, v in tensors.items() if k.startswith("model.layers.0.")}
        extra = {"enorm.weight": torch.ones(hidden), "hnorm.weight": torch.ones(hidden),
                 "eh_proj.weight": torch.cat((torch.eye(hidden), torch.zeros(hidden, hidden)), dim=1),
                 "embed_tokens.weight": tensors["model.embed_tokens.weight"],
                 "shared_head.norm.weight": tensors["model.norm.weight"],
                 "shared_head.head.weight": tensors["lm_head.weight"]}
    else:
        torch.manual_seed(seed + 1)
        transformers.DeepseekV3ForCausalLM(config).save_pretrained(folder / "other")  # experts named as on disk
        block = {k.removeprefix("model.layers.0."): v for k, v in load_file(folder / "other" / "model.safetensors").items()
                 if k.startswith("model.layers.0.")}
        extra = {"enorm.weight": 1 + 0.3 * torch.randn(hidden), "hnorm.weight": 1 + 0.3 * torch.randn(hidden),
                 "eh_proj.weight": torch.randn(hidden, 2 * hidden) / (2 * hidden) ** 0.5,
                 "shared_head.norm.weight": 1 + 0.3 * torch.randn(hidden)}
    prefix = f"model.layers.{config.num_hidden_layers}."
    tensors.update({prefix + k: v.clone().contiguous() for k, v in {**block, **extra}.items()})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((folder / "config.json").read_text())["num_nextn_predict_layers"] == 1
    return model


@pytest.fixture(scope="module")
def copy_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mtp-copy")
    save_deepseek(folder, "copy")
    return folder


@pytest.fixture(scope="module")
def plain(copy_folder):
    return LLM(str(copy_folder), dtype="float32")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def test_mtp_forward_matches_its_formulas(tmp_path):
    """logits = shared_head.head(shared_head.norm(block(eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])))), the
    embedding zeroed at position 0, the block being transformers' DeepSeek-V3 decoder layer with the MTP weights."""
    import transformers

    save_deepseek(tmp_path, "random")
    llm = LLM(str(tmp_path), dtype="float32", speculative_config=SPEC)
    mtp = llm.runner.proposer.model
    tensors = load_file(tmp_path / "model.safetensors")
    prefix, eps = "model.layers.1.", BASE.get("rms_norm_eps", 1e-6)
    ids = torch.tensor(random_prompts((21,), seed=3)[0])  # the tokens after positions 0..20
    previous = torch.randn(len(ids), BASE["hidden_size"], generator=torch.Generator().manual_seed(4))
    _, meta = build_inputs([Span(ids.tolist(), 0, list(range(4)))], llm.runner.proposer.kv_cache,
                           llm.runner.backends.attention, "cpu")
    with torch.inference_mode():
        ours = mtp.compute_logits(mtp(ids, previous, meta))  # [21, vocab]

    embeds = tensors["model.embed_tokens.weight"][ids]  # the target's: this checkpoint's MTP layer has none
    embeds[0] = 0
    x = torch.cat((rms_norm(embeds, tensors[prefix + "enorm.weight"], eps),
                   rms_norm(previous, tensors[prefix + "hnorm.weight"], eps)), dim=-1) @ tensors[prefix + "eh_proj.weight"].T
    state = {"model.layers.0." + k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)
             and not k.removeprefix(prefix).startswith(("enorm", "hnorm", "eh_proj", "shared_head"))}
    state |= {"model.norm.weight": tensors[prefix + "shared_head.norm.weight"], "lm_head.weight": tensors["lm_head.weight"],
              "model.embed_tokens.weight": tensors["model.embed_tokens.weight"]}
    folder = tmp_path / "block-as-a-model"  # the MTP block as layer 0 of a model, its head after the final norm
    transformers.DeepseekV3Config(**{**BASE, **DEEPSEEK}).save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference(inputs_embeds=x[None], position_ids=torch.arange(len(ids))[None]).logits[0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_equal_decoding_without_speculation(copy_folder, plain):
    llm = LLM(str(copy_folder), dtype="float32", speculative_config=SPEC, max_num_batched_tokens=24)  # chunked prefill
    prompts, params = repetitive_prompts(12, seed=1), mixed_params(12, seed=2)
    assert_same(completions(llm, prompts, params), completions(plain, prompts, params))
    accepted, drafted = acceptance(llm)
    assert 0 < accepted < drafted  # some drafts right, some wrong: both paths of verification ran
    assert llm.kv_cache.num_free_blocks == llm.kv_cache.num_blocks


def test_prefix_cache_and_preemption_under_mtp(copy_folder, plain):
    llm = LLM(str(copy_folder), dtype="float32", speculative_config=SPEC, num_kv_blocks=14, block_size=4)
    prompts, params = repetitive_prompts(8, seed=5), mixed_params(8, seed=6)
    for _ in range(2):  # the second round hits the prefix cache the first one filled
        assert_same(completions(llm, prompts, params), completions(plain, prompts, params))
    assert llm.kv_cache.num_hit_tokens > 0
    assert llm.engine.core.scheduler.num_preemptions > 0


def test_a_model_without_mtp_layers_is_refused(tmp_path):
    save_deepseek(tmp_path, None)
    with pytest.raises(ValueError, match=r"^speculative method 'mtp' needs a model with multi-token-prediction "
                                         r"layers; .* \(DeepseekV3ForCausalLM\) has none$"):
        LLM(str(tmp_path), dtype="float32", speculative_config={"method": "mtp"})
