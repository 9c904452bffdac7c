"""Tensor parallel (2 and 4 worker processes on this machine) gives what one process gives: the same greedy
tokens and top-5 logprobs within 1e-4 in float32, for every architecture's tiny checkpoint; seeded sampling
draws the same tokens; a lost worker stops the engine with a clear error; sizes that do not divide the model
are refused in one line."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from ownllm import LLM, SamplingParams
from ownllm.distributed.executor import ExecutorDeadError
from ownllm.layers.parallel import Shard, load_shard
from ownllm.layers.quant import BlockWeight, Int4Weight
from tests.checkpoints import assert_same_generations, build_checkpoint, random_prompts
from tests.test_moe_parity import VARIANTS as MOE_VARIANTS
from tests.test_moe_parity import build as build_moe_checkpoint

NEW_TOKENS = 12
DENSE = {  # name: (architecture, config overrides, tensor parallel size)
    "llama": ("LlamaForCausalLM", {}, 2),
    "llama-mha-tied-odd-vocab-tp4": pytest.param(
        "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=True, vocab_size=391, attention_bias=True,
                                 mlp_bias=True), 4, marks=pytest.mark.slow),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), 2),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32), 2),
    "mistral": ("MistralForCausalLM", dict(sliding_window=8), 2),
}


def compare(folder, tp_size: int, **options) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=5)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=NEW_TOKENS, logprobs=2)
    prompts = random_prompts()
    params = [greedy] * len(prompts) + [seeded]
    prompts = prompts + prompts[:1]

    def run(size: int):
        llm = LLM(str(folder), dtype="float32", tensor_parallel_size=size, num_kv_blocks=64, **options)
        outputs = [output.outputs[0] for output in llm.generate(prompts, params)]
        llm.engine.core.executor.shutdown()
        return outputs

    expected = run(1)
    assert_same_generations(run(tp_size), expected, atol=1e-4)


@pytest.mark.parametrize(("arch", "overrides", "tp_size"), DENSE.values(), ids=DENSE.keys())
def test_dense_matches_one_process(arch, overrides, tp_size, tmp_path):
    build_checkpoint(tmp_path, arch, **overrides)
    compare(tmp_path, tp_size, max_num_batched_tokens=16)  # prompts in chunks: prefill and decode mixed


MOE = ("mixtral", "qwen3moe-renormalized", "llama4-scout-like", "deepseek-v3")  # experts split, attention as dense


@pytest.mark.slow
@pytest.mark.parametrize("name", MOE)
def test_moe_matches_one_process(name, tmp_path):
    arch, overrides = MOE_VARIANTS[name]
    build_moe_checkpoint(tmp_path, arch, overrides)
    compare(tmp_path, 2)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    build_checkpoint(folder, "LlamaForCausalLM")
    return folder


@pytest.mark.slow
def test_gguf_matches_one_process(llama, tmp_path):
    from tests.gguf_writer import write_gguf

    compare(write_gguf(llama, tmp_path / "tiny-F32.gguf"), 2)


def test_a_killed_worker_stops_the_engine_with_a_clear_error(llama):
    llm = LLM(str(llama), dtype="float32", tensor_parallel_size=2, num_kv_blocks=64)
    executor = llm.engine.core.executor
    params = SamplingParams(temperature=0, max_tokens=4)
    assert len(llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids) == 4
    executor.processes[1].kill()
    with pytest.raises(ExecutorDeadError, match=r"tensor-parallel worker rank 1 died during its step \(pid \d+, "
                                                r"exit code -9\); the engine has stopped"):
        llm.generate([[5, 6, 7]], params)
    assert not any(process.is_alive() for process in executor.processes)
    with pytest.raises(ExecutorDeadError, match="the engine has stopped"):  # and stays stopped
        llm.generate([[5, 6, 7]], params)


def test_the_engine_side_imports_no_torch():
    code = "import sys, ownllm.engine.core, ownllm.distributed.executor; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_sizes_that_do_not_divide_the_model_are_refused(llama):
    with pytest.raises(ValueError, match=r"^tensor parallel size 4 does not divide the model's 2 KV heads$"):
        LLM(str(llama), dtype="float32", tensor_parallel_size=4, num_kv_blocks=64)
    with pytest.raises(ValueError, match=r"^tensor parallel size 3 does not divide the model's 4 attention heads$"):
        LLM(str(llama), dtype="float32", tensor_parallel_size=3, num_kv_blocks=64)


@pytest.mark.slow
def test_cli_refuses_a_size_that_does_not_divide_the_model_in_one_line(llama):
    from tests.test_errors import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("run", "--model", str(llama), "--tensor-parallel-size", "3", "hi"),
                          "error: tensor parallel size 3 does not divide the model's 4 attention heads")


def test_options_not_supported_together_are_refused(llama):
    with pytest.raises(ValueError, match=r"^tensor parallel \(tensor_parallel_size > 1\) does not support "
                                         r"speculative decoding$"):
        LLM(str(llama), dtype="float32", tensor_parallel_size=2, speculative_config={"method": "ngram"})
    with pytest.raises(ValueError, match=r"^tensor_parallel_size must be >= 1, got 0$"):
        LLM(str(llama), dtype="float32", tensor_parallel_size=0)


def quantized(values: np.ndarray, qtype: gguf.GGMLQuantizationType):
    blocks = gguf.quants.quantize(values, qtype)
    if qtype == gguf.GGMLQuantizationType.Q4_0:
        return Int4Weight.from_gguf_blocks(blocks, values.shape, has_min=False)
    return BlockWeight.from_gguf_blocks(blocks, values.shape, int(qtype))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_quantized_gguf_weights_split_on_block_boundaries(qtype):
    values = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    weight = quantized(values, getattr(gguf.GGMLQuantizationType, qtype))
    whole = weight.dequantize(torch.float32)
    columns = load_shard({"w": weight}, "w", Shard(1, 64, 128, 64, 2))  # rank 1 of 2: two blocks of 32 each
    assert torch.equal(columns.dequantize(torch.float32), whole[:, 64:])
    rows = load_shard({"w": weight}, "w", Shard(0, 3, 6, 3, 2))
    assert torch.equal(rows.dequantize(torch.float32), whole[3:])
    with pytest.raises(ValueError, match=r"^tensor 'w' is quantized in blocks of 32 weights, and its 128 columns "
                                         r"do not split into 8 parts on block boundaries$"):
        load_shard({"w": weight}, "w", Shard(1, 16, 32, 16, 8))


def test_a_rank_reads_only_its_slice_of_a_safetensors_file(llama):
    from ownllm.loader.hf import SafetensorsWeights, safetensors_files

    tensors = SafetensorsWeights(safetensors_files(llama))
    name = "model.layers.0.mlp.down_proj.weight"  # [hidden, intermediate]: a row-parallel weight splits columns
    shard = load_shard(tensors, name, Shard(1, 64, 128, 64, 2))
    assert torch.equal(shard, tensors[name][:, 64:])
    padded = load_shard(tensors, "lm_head.weight", Shard(0, 380, 384, 6, 64))  # the last, short vocabulary slice
    assert torch.equal(padded[:4], tensors["lm_head.weight"][380:]) and not padded[4:].any()
