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


class _StepEngine:
    """An Engine stand-in: every step gives each unfinished request one more token; a request ends after `length`."""

    tokenizer = model_config = model_path = reasoning_parser = tool_parser_name = None
    max_model_len = 64
    generation_config: dict = {}
    num_waiting = 0

    def __init__(self, length: int) -> None:
        self.length = length
        self.tokens: dict[str, list[int]] = {}
        self.num_steps = 0
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt_token_ids, params, prompt=None, priority=0, images=()) -> None:
        self.tokens[request_id] = []

    def has_unfinished(self) -> bool:
        return bool(self.tokens)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.tokens.pop(request_id, None)

    def step(self):
        from ownllm.outputs import CompletionOutput, RequestOutput

        self.num_steps += 1
        outputs = []
        for request_id, tokens in list(self.tokens.items()):
            tokens.append(len(tokens))
            finished = len(tokens) == self.length
            outputs.append(RequestOutput(request_id, None, [1], [CompletionOutput(0, "", [tokens[-1]], 0.0, None,
                                                                                  "length" if finished else None, None)],
                                         finished))
            if finished:
                del self.tokens[request_id]
        return outputs


def test_a_step_wakes_each_event_loop_once():
    """A step's outputs for many streams of one event loop arrive in one call_soon_threadsafe, in order."""
    fake = _StepEngine(length=5)
    engine = AsyncEngine(fake, "fake")
    delivered_at_once: list[int] = []
    try:
        async def main() -> list[list[int]]:
            loop = asyncio.get_running_loop()
            plain = loop.call_soon_threadsafe

            def counting(callback, *args, **kwargs):
                if callback is async_module._put_all:
                    delivered_at_once.append(len(args[0]))
                return plain(callback, *args, **kwargs)

            loop.call_soon_threadsafe = counting
            ids = [f"r{i}" for i in range(8)]
            held = threading.Event()  # the engine thread waits until every request's add is queued behind this
            engine._send(held.wait)
            streams = [engine.generate([1], SamplingParams(max_tokens=5), request_id=rid) for rid in ids]
            firsts = [asyncio.ensure_future(anext(s)) for s in streams]
            await asyncio.sleep(0.05)
            held.set()
            outputs = [[(await first).outputs[0].token_ids[0]] for first in firsts]
            for out, stream in zip(outputs, streams):
                out += [o.outputs[0].token_ids[0] async for o in stream]
            return outputs

        outputs = asyncio.run(main())
    finally:
        engine.shutdown()
    assert outputs == [[0, 1, 2, 3, 4]] * 8
    assert delivered_at_once == [8] * 5 and fake.num_steps == 5  # one wake-up a step, carrying all 8 outputs
