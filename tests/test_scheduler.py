"""The scheduler alone (no model, no torch): token budget, chunked prefill, preemption and resumption, priority."""

from __future__ import annotations

from ownllm.config import SchedulerConfig
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.engine.scheduler import Scheduler
from ownllm.request import Request, RequestStatus
from ownllm.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, budget=16, max_seqs=8, prefix_caching=True) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_seqs), KVCacheManager(num_blocks, block_size, prefix_caching))


def request(rid: str, prompt_len: int, first_token: int = 1, **kwargs) -> Request:
    return Request(rid, list(range(first_token, first_token + prompt_len)), SamplingParams(max_tokens=100), **kwargs)


class Step:
    """One scheduled step, seen as lists in batch order."""

    def __init__(self, s: Scheduler, out):
        self.out = out
        by_id = {r.request_id: r for r in s.running}
        self.requests = [by_id[rid] for rid in out.request_ids]
        self.num_tokens = list(out.num_scheduled_tokens.values())
        self.samples = [r.num_computed_tokens + n >= r.num_tokens for r, n in zip(self.requests, self.num_tokens)]
        self.block_tables = [s.kv_cache.block_ids(r.request_id) for r in self.requests]
        self.preempted_ids = sorted(rid for rid in out.finished_request_ids if rid not in s.kv_cache.req_blocks)
        self.num_batched_tokens = out.num_batched_tokens


def run_step(s: Scheduler, token: int = 7) -> Step:
    """One step with a fake model: every request that reaches its end gets `token`."""
    step = Step(s, s.schedule())
    for r, n, sample in zip(step.requests, step.num_tokens, step.samples):
        s.advance(r, n, 0, 0)
        if sample:
            r.output_token_ids.append(token)
        s.cache_blocks(r)
    return step


def test_prompt_is_chunked_under_the_token_budget():
    s = make(budget=16)
    r = request("a", 40)
    s.add(r)
    sizes = []
    while not r.output_token_ids:
        out = run_step(s)
        sizes.append(out.num_tokens[0])
        assert out.num_batched_tokens <= 16
    assert sizes == [16, 16, 8]
    assert run_step(s).num_tokens == [1]  # then it decodes one token per step
    assert out.samples == [True]


def test_decodes_go_first_and_prefills_fill_the_rest_of_the_budget():
    s = make(budget=16)
    a, b = request("a", 6), request("b", 30, first_token=100)
    s.add(a)
    run_step(s)
    s.add(b)
    out = run_step(s)
    assert [r.request_id for r in out.requests] == ["a", "b"]
    assert out.num_tokens == [1, 15] and out.samples == [True, False]


def test_max_num_seqs_limits_admission():
    s = make(max_seqs=2, budget=100)
    for i in range(3):
        s.add(request(f"r{i}", 3, first_token=10 * i))
    out = run_step(s)
    assert [r.request_id for r in out.requests] == ["r0", "r1"] and s.num_waiting == 1


def test_block_tables_follow_allocation():
    s = make(block_size=4, budget=100)
    s.add(request("a", 9))
    out = s.schedule()
    assert [n.block_ids for n in out.new_requests] == [[0, 1, 2]]


def test_preemption_frees_the_most_recent_request_and_it_resumes_with_its_tokens():
    s = make(num_blocks=4, block_size=4, budget=64, prefix_caching=False)
    a, b = request("a", 7), request("b", 7, first_token=50)
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 2 blocks each, the pool is full
    assert s.kv_cache.num_free_blocks == 0
    a.output_token_ids.append(8)  # a will need a third block at position 8
    out = run_step(s)
    assert out.preempted_ids == ["b"]
    assert [r.request_id for r in out.requests] == ["a"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.output_token_ids == [7]
    assert s.kv_cache.block_ids("b") == []
    s.finish(a)  # a finishes; b is readmitted and recomputes prompt + its output token
    out = run_step(s)
    assert out.requests == [b] and out.num_tokens == [8] and out.samples == [True]
    assert b.status is RequestStatus.RUNNING


def test_a_request_that_cannot_grow_preempts_itself_not_older_ones():
    s = make(num_blocks=3, block_size=4, budget=64, prefix_caching=False)
    a, b = request("a", 8), request("b", 3, first_token=50)
    s.add(a)
    s.add(b)
    run_step(s)  # a: 2 blocks, b: 1 block
    a.output_token_ids.append(9)
    out = run_step(s)  # a needs a 3rd block: b (most recent) is preempted
    assert out.preempted_ids == ["b"] and out.requests == [a]


def test_priority_then_arrival_order():
    s = make(budget=4, max_seqs=8)
    low = request("low", 4, priority=5, arrival_time=1.0)
    high = request("high", 4, first_token=40, priority=-1, arrival_time=2.0)
    early = request("early", 4, first_token=80, priority=5, arrival_time=0.5)
    for r in (low, high, early):
        s.add(r)
    assert [r.request_id for r in s.waiting] == ["high", "early", "low"]
    assert run_step(s).requests == [high]


def test_prefix_cache_hit_skips_computed_blocks():
    s = make(block_size=4, budget=64)
    a = request("a", 10)
    s.add(a)
    run_step(s)
    b = Request("b", list(range(1, 9)) + [77, 78], SamplingParams())
    s.add(b)
    out = run_step(s)
    assert out.requests == [a, b] and out.num_tokens == [1, 2]  # b reuses a's two full blocks
    assert s.kv_cache.block_ids("b")[:2] == s.kv_cache.block_ids("a")[:2]
    assert (s.kv_cache.num_query_tokens, s.kv_cache.num_hit_tokens) == (20, 8)


def test_requests_sharing_a_prefix_at_once_compute_it_once():
    """b's first block is the one a computes in the same step: b waits a step and then finds it (and the next)
    cached, where admitting both at once would compute the shared blocks twice; c, which shares nothing, does
    not wait."""
    s = make(block_size=4, budget=64)
    shared = list(range(1, 9))  # two full blocks
    a = Request("a", shared + [50, 51], SamplingParams())
    b = Request("b", shared + [60, 61, 62], SamplingParams())
    c = request("c", 6, first_token=100)
    for r in (a, b, c):
        s.add(r)
    first = run_step(s)
    assert first.requests == [a, c] and first.num_tokens == [10, 6] and s.waiting == [b]
    second = run_step(s)
    assert second.requests == [a, c, b] and second.num_tokens == [1, 1, 3]
    assert s.kv_cache.block_ids("b")[:2] == s.kv_cache.block_ids("a")[:2]
