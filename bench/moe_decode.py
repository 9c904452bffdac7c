"""Decode speed of mixture-of-experts models beside dense Llamas of equal total and equal active parameters.

    python bench/moe_decode.py [--new-tokens 32] [--repeats 2] [--threads 2] [--batches 1,16]

Random-weight bfloat16 checkpoints built by transformers and cached under bench/.cache/moe/:
- mixtral-like: hidden 1024, 8 layers, GQA 16/4 heads, 8 experts of width 3584, top-2;
- deepseek-v3-like: hidden 1024, 8 layers (the first dense), MLA (q_lora 384, kv_lora 256, 16 heads),
  64 routed experts of width 256, 6 active, 2 shared, 8 groups / top-4 groups;
and for each a Llama (hidden 1024, 8 layers, GQA 16/4) whose MLP width gives it the MoE's total, or its
active, parameter count (vocab 384 everywhere, so embeddings do not blur the comparison). Each model
decodes through `ownllm.LLM` in bfloat16 at each batch size, prefix caching off: decode tokens/s =
batch * (new_tokens - 1) / (time of the full run - time of a 1-token run), median of `repeats`, the
three models of a group taking turns so that load from other processes hits them alike.
Results go to bench/RESULTS.md (section "MoE decode").
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "moe"
BUILD_VERSION = 1
COMMON = dict(vocab_size=384, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, max_position_embeddings=4096,
              rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LLAMA_ATTENTION = dict(num_key_value_heads=4, head_dim=64)
MOE_SHAPES = {
    "mixtral-like": ("MixtralForCausalLM", dict(COMMON, **LLAMA_ATTENTION, intermediate_size=3584,
                                               num_local_experts=8, num_experts_per_tok=2)),
    "deepseek-v3-like": ("DeepseekV3ForCausalLM", dict(
        COMMON, num_key_value_heads=16, intermediate_size=2816, moe_intermediate_size=256, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, n_group=8, topk_group=4, first_k_dense_replace=1,
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)),
}


def config_of(arch: str, shape: dict):
    import transformers

    return getattr(transformers, arch.replace("ForCausalLM", "Config"))(**shape)


def param_counts(arch: str, shape: dict) -> tuple[int, int]:
    """(total, active per token) parameters, counted on a meta-device transformers model."""
    import transformers

    config = config_of(arch, shape)
    with torch.device("meta"):
        model = getattr(transformers, arch)(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for name, param in model.named_parameters():
        if ".experts." in name and "shared" not in name:
            num_experts = param.shape[0]
            inactive += param.numel() * (num_experts - config.num_experts_per_tok) // num_experts
    return total, total - inactive


def llama_shape(target_params: int) -> dict:
    """A Llama of COMMON's shape whose MLP width makes it `target_params` parameters."""
    per_width = 3 * COMMON["hidden_size"] * COMMON["num_hidden_layers"]
    base = param_counts("LlamaForCausalLM", dict(COMMON, **LLAMA_ATTENTION, intermediate_size=1))[0] - per_width
    return dict(COMMON, **LLAMA_ATTENTION, intermediate_size=round((target_params - base) / per_width))


def build(name: str, arch: str, shape: dict) -> Path:
    import transformers

    from tests.checkpoints import save_tiny_tokenizer

    folder = CACHE / f"{name}-v{BUILD_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    print(f"building {name} ...", flush=True)
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = getattr(transformers, arch)(config_of(arch, shape))
    finally:
        torch.set_default_dtype(saved)
    model.to(torch.bfloat16).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    del model
    gc.collect()
    return folder


def decode_seconds(llm, batch: int, new_tokens: int) -> float:
    """Seconds of the decode steps of one greedy run: a full run's time minus a 1-token run's."""
    from ownllm import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, 384, (16,), generator=g).tolist() for _ in range(batch)]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens,
                                                   ignore_eos=True))
    total = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    return total - prefill


def decode_speeds(folders: list[Path], batches: list[int], new_tokens: int, repeats: int) -> list[list[float]]:
    """[model][batch] median decode tokens/s. The models take turns within each repeat, so a load change on
    a shared machine hits them alike rather than skewing their ratio."""
    from ownllm import LLM

    llms = [LLM(str(f), dtype="bfloat16", enable_prefix_caching=False, kv_cache_memory=256 * 2**20) for f in folders]
    for llm in llms:
        decode_seconds(llm, 1, 4)  # warm-up
    runs = [[[] for _ in batches] for _ in llms]
    for _ in range(repeats):
        for i, llm in enumerate(llms):
            for j, batch in enumerate(batches):
                runs[i][j].append(batch * (new_tokens - 1) / decode_seconds(llm, batch, new_tokens))
    del llms
    gc.collect()
    return [[statistics.median(r) for r in model_runs] for model_runs in runs]


def kv_bytes_line() -> str:
    from ownllm.config import ModelConfig
    from ownllm.layers.attention import KVCacheSpec
    from ownllm.models.deepseek_v3 import DeepseekV3ForCausalLM

    arch, shape = MOE_SHAPES["deepseek-v3-like"]
    config = ModelConfig.from_hf({**shape, "architectures": [arch]}, "bfloat16")
    mla = DeepseekV3ForCausalLM.kv_cache_spec(config).bytes_per_token(torch.bfloat16)
    heads, qk = shape["num_attention_heads"], shape["qk_nope_head_dim"] + shape["qk_rope_head_dim"]
    expanded = KVCacheSpec(shape["num_hidden_layers"], heads, qk, shape["v_head_dim"]).bytes_per_token(torch.bfloat16)
    gqa = KVCacheSpec(shape["num_hidden_layers"], LLAMA_ATTENTION["num_key_value_heads"], LLAMA_ATTENTION["head_dim"],
                      LLAMA_ATTENTION["head_dim"]).bytes_per_token(torch.bfloat16)
    return (f"KV cache of deepseek-v3-like, bfloat16: MLA latent {mla} bytes/token; the same attention with expanded "
            f"per-head keys and values {expanded} bytes/token ({expanded / mla:.1f}x); the dense Llamas' GQA "
            f"(4 KV heads of 64) {gqa} bytes/token.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    table = ["| model | params total / active | " + " | ".join(f"decode tok/s, batch {b}" for b in batches)
             + " | MoE batch-1 speed / this row's |", "|---|---|" + "---|" * len(batches) + "---|"]
    for moe_name, (arch, shape) in MOE_SHAPES.items():
        total, active = param_counts(arch, shape)
        rows = [(moe_name, moe_name, arch, shape),
                (f"llama, equal total ({moe_name})", f"llama-equal-total-{moe_name}", "LlamaForCausalLM", llama_shape(total)),
                (f"llama, equal active ({moe_name})", f"llama-equal-active-{moe_name}", "LlamaForCausalLM",
                 llama_shape(active))]
        folders = [build(folder, row_arch, row_shape) for _, folder, row_arch, row_shape in rows]
        speeds = decode_speeds(folders, batches, args.new_tokens, args.repeats)
        for (name, _, row_arch, row_shape), row_speeds in zip(rows, speeds):
            row_total, row_active = param_counts(row_arch, row_shape)
            table.append(f"| {name} | {row_total / 1e6:.0f}M / {row_active / 1e6:.0f}M | "
                         + " | ".join(f"{s:.1f}" for s in row_speeds) + f" | {speeds[0][0] / row_speeds[0]:.2f}x |")
            print(table[-1], flush=True)
    body = "\n".join([
        f"Command: `python bench/moe_decode.py --new-tokens {args.new_tokens} --repeats {args.repeats} "
        f"--threads {args.threads} --batches {args.batches}`",
        f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}; bfloat16 weights and "
        f"compute, random weights, 16-token prompts, {args.new_tokens} new tokens, greedy, median of {args.repeats}. "
        "The three models of a group take turns within each repeat.",
        "", *table, "", kv_bytes_line(), "",
    ])
    print(body)
    write_section("MoE decode", body)


if __name__ == "__main__":
    main()
