"""A fault inside the engine for one request (an exception in the model forward on its tokens, or in sampling
its row), injected into the in-process server while it shares a batch with innocent requests: that request
gets a 500 naming an internal error, the others finish with exactly the tokens they get alone, every KV block
comes back, and the server keeps serving."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

import ownllm.worker.model_runner as model_runner
from ownllm.server import ServerSettings, build_app
from tests.server.inprocess import TINY_NAME, inprocess_engine, wait_idle

POISON_TOKEN = 377  # a prompt holding it breaks the forward
POISON_SEED = 4242  # a request with this seed breaks the sampler
PROMPTS = [[5, 9, 14, 20], [30, 31], [40, 41, 42, 43, 44, 45], [7]]
GREEDY = {"model": TINY_NAME, "temperature": 0, "max_tokens": 12, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny64_model):
    with inprocess_engine(tiny64_model) as engine:
        yield engine


@pytest.fixture(scope="module")
def app(engine):
    return build_app(engine, ServerSettings())


async def _complete(client: httpx.AsyncClient, prompt: list[int], **options) -> httpx.Response:
    return await client.post("/v1/completions", json={**GREEDY, "prompt": prompt, **options})


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


class Faults:
    """Raises in the forward or the sampler for the poisoned request; counts the batch sizes it broke."""

    def __init__(self, engine, monkeypatch) -> None:
        self.broken_batch_sizes: list[int] = []
        runner = engine.engine.runner
        forward, sample = runner.model.forward, model_runner.sample_and_verify

        def faulty_forward(input_ids, meta):
            if POISON_TOKEN in input_ids.tolist():
                self.broken_batch_sizes.append(len(meta.seq_lens))
                raise RuntimeError("injected forward fault")
            return forward(input_ids, meta)

        def faulty_sample(sampler, logits, states, *args):
            if any(state.params.seed == POISON_SEED for state in states):
                self.broken_batch_sizes.append(len(states))
                raise ValueError("injected sampler fault")
            return sample(sampler, logits, states, *args)

        monkeypatch.setattr(runner.model, "forward", faulty_forward)
        monkeypatch.setattr(model_runner, "sample_and_verify", faulty_sample)


@pytest.mark.parametrize("poison, stream", [
    (dict(prompt=[3, POISON_TOKEN, 8]), False), (dict(prompt=[3, 8], seed=POISON_SEED), False),
    (dict(prompt=[3, POISON_TOKEN, 8]), True), (dict(prompt=[3, 8], seed=POISON_SEED, n=2), True),
])
def test_a_fault_fails_only_its_request(engine, app, monkeypatch, poison, stream):
    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://ownllm") as client:
            alone = [_text(await _complete(client, p)) for p in PROMPTS]
            faults = Faults(engine, monkeypatch)
            gate = threading.Event()
            engine._send(gate.wait)  # hold the engine so every request below joins the same first step
            calls = [_complete(client, p) for p in PROMPTS]
            calls.insert(2, _complete(client, stream=stream, **poison))
            tasks = [asyncio.ensure_future(call) for call in calls]
            while engine._commands.qsize() < len(calls):  # each request's add waits behind the gate
                await asyncio.sleep(0.01)
            gate.set()
            responses = await asyncio.gather(*tasks)
            failed = responses.pop(2)
            assert faults.broken_batch_sizes[0] > 1  # the fault struck a shared batch
            assert failed.status_code == 500
            error = failed.json()["error"]
            assert error["code"] == "internal_error" and "internal server error" in error["message"]
            assert [_text(r) for r in responses] == alone
            assert _text(await _complete(client, PROMPTS[0])) == alone[0]  # still serving

    asyncio.run(scenario())
    wait_idle(engine)
