"""Config parsing and validation: every bad value is refused with a message naming it."""

from __future__ import annotations

import pytest

from ownllm.config import CacheConfig, ModelConfig, SchedulerConfig, normalize_dtype, parse_memory_size


def test_memory_sizes():
    assert parse_memory_size("2GiB") == 2 * 2**30
    assert parse_memory_size("512MB") == 512 * 10**6
    assert parse_memory_size("1e9") == 10**9
    with pytest.raises(ValueError, match="'lots'"):
        parse_memory_size("lots")


@pytest.mark.parametrize("make, field", [
    (lambda: CacheConfig(block_size=12), "block_size"), (lambda: CacheConfig(memory_bytes=0), "memory"),
    (lambda: SchedulerConfig(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (lambda: SchedulerConfig(max_num_seqs=0), "max_num_seqs"), (lambda: normalize_dtype("int3"), "int3"),
])
def test_bad_values_are_named(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_rope_settings_from_v4_and_v5_configs():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2}
    v4 = ModelConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    v5 = ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    assert v4.rope_theta == v5.rope_theta == 5e5
    assert v4.rope_scaling == v5.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_heads_must_divide():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2})
