"""EngineConfig.max_model_len (`ownllm serve --max-model-len`): it shortens the served context, and a value past
the model's own context is refused with the bounds."""

from __future__ import annotations

import pytest

from ownllm import SamplingParams
from ownllm.config import EngineConfig
from ownllm.engine.build import build_engine
from ownllm.request import Request
from tests.checkpoints import build_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=128)
    return str(folder)


def test_max_model_len_shortens_the_context(tiny):
    engine = build_engine(EngineConfig(tiny, "float32", max_model_len=48))
    assert engine.max_model_len == 48
    with pytest.raises(ValueError, match="48 tokens"):
        engine.core.add_request(Request("r", [5] * 48, SamplingParams()))


def test_max_model_len_past_the_model_is_refused(tiny):
    with pytest.raises(ValueError, match=r"max_model_len must be in \[1, 128\] \(the model's context\), got 129"):
        build_engine(EngineConfig(tiny, "float32", max_model_len=129))
