"""AsyncEngine.from_config: the model loads on the engine thread (the only thread that runs OpenMP work), load
errors reach the caller, and streams give what the offline engine gives."""

from __future__ import annotations

import asyncio
import threading

import pytest

import ownllm.engine.async_engine as async_module
from ownllm import LLM, SamplingParams
from ownllm.config import EngineConfig
from ownllm.engine.async_engine import AsyncEngine
from tests.checkpoints import build_checkpoint, random_prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=64)
    return folder


def test_loads_and_runs_on_the_engine_thread(folder, monkeypatch):
    loaded_on = []

    def recording(config):
        loaded_on.append(threading.current_thread())
        return build_engine(config)

    build_engine = async_module.build_engine
    monkeypatch.setattr(async_module, "build_engine", recording)
    engine = AsyncEngine.from_config(EngineConfig(str(folder), dtype="float32"))
    try:
        assert loaded_on == [engine._thread] and engine._thread is not threading.current_thread()
        prompt = random_prompts((9,), seed=2)[0]
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

        async def stream() -> list[int]:
            outputs = [out async for out in engine.generate(prompt, params)]
            return outputs[-1].outputs[0].token_ids

        expected = LLM(str(folder), dtype="float32").generate([prompt], params)[0].outputs[0].token_ids
        assert asyncio.run(stream()) == expected
    finally:
        engine.shutdown()


def test_a_load_error_reaches_the_caller(tmp_path):
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError):
        AsyncEngine.from_config(EngineConfig(str(tmp_path / "missing.gguf")))
