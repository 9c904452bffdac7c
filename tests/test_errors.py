"""Every expected failure gives one line naming the problem (and a non-zero exit from the CLI), never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ownllm import LLM
from tests.checkpoints import build_checkpoint


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ownllm.cli", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=32)
    return folder


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(str(tmp_path / "no-such-model"))
    assert_one_line_error(run_cli("run", "--model", str(tmp_path / "no-such-model"), "hi"), "no-such-model")


def test_hub_id_not_in_cache_offline(tmp_path):
    result = run_cli("run", "--model", "nobody/not-a-model", "hi",
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_one_line_error(result, "nobody/not-a-model", "cache")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("run", "--model", str(tmp_path / "empty"), "hi"), "config.json")


def test_missing_weights(tiny, tmp_path):
    broken = copy_checkpoint(tiny, tmp_path / "noweights")
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(broken))


def test_missing_shard_named(tmp_path):
    folder = tmp_path / "sharded"
    build_checkpoint(folder, "LlamaForCausalLM", max_shard_size="50KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        LLM(str(folder))


def test_truncated_weights(tiny, tmp_path):
    broken = copy_checkpoint(tiny, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(run_cli("run", "--model", str(broken), "hi"), "model.safetensors")


def test_missing_tensor_named(tiny, tmp_path):
    broken = copy_checkpoint(tiny, tmp_path / "missing-tensor")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run_cli("run", "--model", str(broken), "hi"), "model.layers.1.mlp.up_proj.weight")


def test_unsupported_architecture_lists_supported(tiny, tmp_path):
    broken = copy_checkpoint(tiny, tmp_path / "gpt2")
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("run", "--model", str(broken), "hi"), "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_unsupported_architecture_named_before_its_fields(tmp_path):
    folder = tmp_path / "starcoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["GPTBigCodeForCausalLM"], "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100}))
    assert_one_line_error(run_cli("run", "--model", str(folder), "hi"),
                          "'GPTBigCodeForCausalLM' is not supported; supported: ", "LlamaForCausalLM")


def test_prompt_longer_than_context(tiny):
    assert_one_line_error(run_cli("run", "--raw", "--model", str(tiny), "word " * 100), "context is 32 tokens")


@pytest.mark.parametrize("option, value, field", [
    ("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"), ("--top-p", "1.5", "top_p"),
    ("--dtype", "int3", "dtype"),
])
def test_invalid_sampling_values(tiny, option, value, field):
    assert_one_line_error(run_cli("run", "--model", str(tiny), option, value, "hi"), field)


def test_options_checked_before_the_model_is_looked_for(tmp_path):
    assert_one_line_error(run_cli("run", "--model", str(tmp_path / "no-such-model"), "--temperature", "-1", "hi"),
                          "temperature must be >= 0, got -1.0")


@pytest.mark.parametrize("option, value, words", [
    ("--dtype", "int3", "dtype 'int3' is not supported"),
    ("--device", "tpu", "device 'tpu' is not supported"),
    ("--max-body-size", "lots", "memory size 'lots' is not understood"),
    ("--kv-cache-memory", "lots", "memory size 'lots' is not understood"),
    ("--speculative-config", "ngram", "the speculative config is not valid JSON"),
])
def test_serve_options_checked_before_the_model_is_looked_for(tmp_path, option, value, words):
    assert_one_line_error(run_cli("serve", "--model", str(tmp_path / "no-such-model"), option, value), words)


def test_unusable_device(tiny):
    import torch

    with pytest.raises(ValueError, match="'tpu' is not supported; use cpu or cuda"):
        LLM(str(tiny), device="tpu")
    if torch.cuda.is_available():
        return  # the rest checks a machine without a GPU
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        LLM(str(tiny), device="cuda")
    assert_one_line_error(run_cli("run", "--model", str(tiny), "--device", "cuda", "hi"), "cuda", "no CUDA GPU")


@pytest.mark.parametrize("config, words", [
    ('{"method": "medusa"}', "speculative method 'medusa' is not supported; choose one of ngram, draft_model, mtp"),
    ('{"method": "ngram", "k": 3}', "the speculative config has unknown keys k; known:"),
    ('{"num_speculative_tokens": 3}', "the speculative config needs a 'method'"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be in [1, 16], got 0"),
    ('{"method": "draft_model"}', "names a draft 'model' exactly when its method is draft_model"),
    ("ngram", "the speculative config is not valid JSON"),
    ('{"method": "mtp"}', "speculative method 'mtp' needs a model with multi-token-prediction layers;"),
])
def test_bad_speculative_config(tiny, config, words):
    assert_one_line_error(run_cli("run", "--model", str(tiny), "--speculative-config", config, "hi"), words)


@pytest.mark.parametrize("option, words", [
    ("attention_backend", "attention backend 'flash' is unknown; choose one of torch, cpu_kernels"),
    ("moe_backend", "MoE backend 'flash' is unknown; choose one of reference, fast"),
    ("mla_backend", "MLA backend 'flash' is unknown; choose one of auto, expanded, absorbed"),
    ("quant_method", "quant method 'flash' is unknown; choose one of kernels, dequantized"),
])
def test_unknown_layer_backend(tiny, option, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        LLM(str(tiny), **{option: "flash"})
