"""The soak's client logic (bench/soak.py) for a few seconds against the tiny live server: streamed mixed
requests, some closed mid-answer, then every completed answer equal to its request's answer alone, no error, and
no KV block held once idle. A tampered answer must be caught, so the check itself can fail."""

from __future__ import annotations

import asyncio
import dataclasses

from bench.soak import build_pool, compare, reference_answers, run_clients, wait_idle
from tests.server.conftest import TINY_NAME

CONTEXT = 256  # what the long requests fill: far below the tiny server's context, so their prefill stays cheap


def test_soak_clients_get_the_answers_they_would_get_alone(tiny_server):
    pool = build_pool(tiny_server.url, TINY_NAME, CONTEXT, seed=1, size=8)  # one request of each kind
    assert {request.kind for request in pool} >= {"chat n>1 logprobs", "completion stop", "long chat"}
    result = asyncio.run(run_clients(tiny_server.url, pool, num_clients=4, seconds=3, disconnecting_share=0.25,
                                     max_disconnect_chunk=2))
    assert result.errors == []
    assert result.num_completed > 0 and result.num_disconnected > 0
    idle = wait_idle(tiny_server.url)
    assert idle["ownllm_kv_cache_blocks_used"] == 0
    references = asyncio.run(reference_answers(tiny_server.url, pool, result.completed))
    comparison = compare(pool, result, references)
    assert comparison.mismatches == [] and comparison.num_checked >= result.num_completed

    index, responses = next(iter(result.completed.items()))
    tampered = dataclasses.replace(responses[0][0], text=responses[0][0].text + "!")
    result.completed = {index: [[tampered]]}
    assert len(compare(pool, result, references).mismatches) == 1
