"""`ownllm serve --replicas 2` on a local Ray instance (the CLI starts it with ray.init(num_cpus=2)): two engine
replicas of the bundled model behind one ingress, checked through the official openai client; prefix-aware routing
(x-ownllm-replica names who answered); /health and /metrics per replica; a killed replica's in-flight request fails
with an error (never hangs), and the replica is replaced. One server for the module: Ray starts slowly."""

from __future__ import annotations

import os
import signal
import time
from typing import Iterator

import httpx
import pytest

pytest.importorskip("ray.serve", reason="the ownllm[ray] extra (Ray Serve) is not installed: pip install 'ownllm[ray]'")
openai = pytest.importorskip("openai")

from ownllm.loader.resolve import BUNDLED_MODEL_NAME  # noqa: E402
from tests.server.conftest import Server, start_server  # noqa: E402

pytestmark = pytest.mark.slow
LONG_SYSTEM = "You are a careful assistant for a travel agency. " * 24  # ~250 tokens: 15 full blocks
REPLACEMENT_SECONDS = 180


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("logs"), None, "--replicas", "2", "--kv-cache-memory", "128MiB",
                      env={"RAY_DEDUP_LOGS": "0"}) as server:
        yield server


@pytest.fixture(scope="module")
def client(replicas) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{replicas.url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, system: str, user: str, **options):
    """-> (answer text, the replica that answered)."""
    raw = client.chat.completions.with_raw_response.create(
        model=BUNDLED_MODEL_NAME, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        max_tokens=8, temperature=0, **options)
    return raw.parse().choices[0].message.content, raw.headers["x-ownllm-replica"]


def health(server: Server) -> list[dict]:
    return httpx.get(f"{server.url}/health", timeout=30).json()["replicas"]


def test_two_replicas_answer_the_openai_client(replicas, client):
    assert len(health(replicas)) == 2
    answer, _ = chat(client, "You are terse.", "Name a colour.")
    stream = client.chat.completions.create(
        model=BUNDLED_MODEL_NAME, messages=[{"role": "system", "content": "You are terse."},
                                            {"role": "user", "content": "Name a colour."}],
        max_tokens=8, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert answer and streamed == answer  # greedy: the same answer, whole or streamed


def test_routing_follows_the_prompt_prefix(replicas, client):
    _, first = chat(client, LONG_SYSTEM, "Where should I go in May?")
    hits_before = _prefix_hits(replicas)[first]
    _, second = chat(client, LONG_SYSTEM, "And in December?")
    assert second == first
    assert _prefix_hits(replicas)[first] - hits_before >= 15 * 16  # its system prompt came from that cache
    answered = {chat(client, f"You are assistant number {i}. " * 30, "Hello.")[1] for i in range(2)}
    assert answered == {r["replica"] for r in health(replicas)}  # distinct prompts spread over both


def test_metrics_label_each_replica(replicas):
    text = httpx.get(f"{replicas.url}/metrics", timeout=30).text
    assert "ownllm_replicas 2.0" in text
    for replica in health(replicas):
        assert f'ownllm_num_requests_running{{replica="{replica["replica"]}"}}' in text


def test_a_killed_replica_fails_its_request_and_is_replaced(replicas, client):
    raw = client.chat.completions.with_raw_response.create(
        model=BUNDLED_MODEL_NAME, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=2000,
        stream=True, extra_body={"ignore_eos": True})
    victim = raw.headers["x-ownllm-replica"]
    stream = iter(raw.parse())
    next(stream)
    os.kill(next(r["pid"] for r in health(replicas) if r["replica"] == victim), signal.SIGKILL)
    with pytest.raises(openai.APIError, match="the replica serving this request failed"):
        for _ in stream:
            pass
    deadline = time.monotonic() + REPLACEMENT_SECONDS
    while len(alive := health(replicas)) < 2 or victim in {r["replica"] for r in alive}:
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {alive}"
        time.sleep(1)
    answered = {chat(client, f"You are helper {i}. " * 30, "Hi.")[1] for i in range(2)}
    assert answered == {r["replica"] for r in alive}


def _prefix_hits(server: Server) -> dict[str, float]:
    """Prefix-cache hit tokens per replica."""
    hits = {}
    for name, value in server.metrics().items():
        if name.startswith("ownllm_prefix_cache_hits_total{"):
            hits[name.split('replica="')[1].split('"')[0]] = value
    return hits
