"""The engine's control plane driven by a fake runner (no model, no torch): the step protocol's plain data,
acceptance known before counters advance, rejected drafts rolled back and never hashed into the prefix cache,
stops in the middle of an accepted run, and speculation backing off under load."""

from __future__ import annotations

import pytest

from ownllm.config import SchedulerConfig
from ownllm.distributed.executor import UniprocExecutor
from ownllm.engine.core import EngineCore
from ownllm.engine.kv_cache import KVCacheManager, hash_block
from ownllm.outputs import RunnerOutput, SampleLogprobs, SchedulerOutput
from ownllm.request import Request
from ownllm.sampling_params import SamplingParams
from ownllm.tokenizer import Tokenizer
from tests.checkpoints import save_tiny_tokenizer


def next_token(token: int) -> int:
    """The fake model: a fixed successor for every token."""
    return (3 * token + 1) % 97 + 3


class FakeRunner:
    """Keeps its own request state from the step's data, 'samples' next_token, accepts drafts while they equal
    it, and proposes num_drafts drafts of which the first num_right[request] are right."""

    def __init__(self, num_drafts: int = 0, num_right: dict[str, int] | None = None) -> None:
        self.num_drafts = num_drafts
        self.num_right = num_right or {}
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}
        self.outputs: list[SchedulerOutput] = []

    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self.outputs.append(so)
        for request_id in so.finished_request_ids:
            del self.tokens[request_id]
        for new in so.new_requests:
            assert new.request_id not in self.tokens, "new request data is sent once"
            self.tokens[new.request_id] = new.prompt_token_ids + new.output_token_ids
            self.computed[new.request_id] = new.num_computed_tokens
        for cached in so.cached_requests:
            self.computed[cached.request_id] = cached.num_computed_tokens
        out = RunnerOutput(request_ids=so.request_ids)
        for request_id, num_new in so.num_scheduled_tokens.items():
            tokens, drafts = self.tokens[request_id], so.draft_token_ids.get(request_id, [])
            sampled, accepted = [], 0
            if self.computed[request_id] + num_new >= len(tokens) + len(drafts):
                sampled = [next_token(tokens[-1])]
                while accepted < len(drafts) and drafts[accepted] == sampled[-1]:
                    accepted += 1
                    sampled.append(next_token(sampled[-1]))
                tokens += sampled
                out.draft_token_ids[request_id] = self._drafts(request_id, tokens[-1])
            out.sampled_token_ids.append(sampled)
            out.logprobs.append([SampleLogprobs(-1.0, 0)] * len(sampled))
            out.num_accepted_draft_tokens.append(accepted)
        return out

    def _drafts(self, request_id: str, last: int) -> list[int]:
        drafts = []
        for i in range(self.num_drafts):
            last = next_token(last) + (0 if i < self.num_right.get(request_id, self.num_drafts) else 1)
            drafts.append(last)
        return drafts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tiny_tokenizer(folder)
    return Tokenizer.from_dir(folder)


def make_core(tokenizer, runner, num_blocks=64, block_size=4, max_num_spec_rows=32) -> EngineCore:
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16, max_num_spec_rows=max_num_spec_rows)
    return EngineCore(UniprocExecutor(runner), KVCacheManager(num_blocks, block_size), tokenizer, 200, config, eos_token_ids=[2])


def add(core: EngineCore, request_id: str, prompt_len: int, first: int = 10, **params) -> Request:
    request = Request(request_id, [first + i for i in range(prompt_len)], SamplingParams(**{"max_tokens": 30, **params}))
    core.output_processor.add(request)
    core.add_request(request)
    return request


def expected_tokens(prompt_last: int, count: int) -> list[int]:
    tokens, last = [], prompt_last
    for _ in range(count):
        last = next_token(last)
        tokens.append(last)
    return tokens


def run(core: EngineCore) -> None:
    while core.has_unfinished():
        core.step()


def test_new_request_data_once_then_only_new_blocks(tokenizer):
    runner = FakeRunner()
    core = make_core(tokenizer, runner, block_size=4)
    add(core, "a", 6, max_tokens=5)
    run(core)
    first, second, _, fourth = runner.outputs[:4]
    assert [n.request_id for n in first.new_requests] == ["a"] and first.new_requests[0].block_ids == [0, 1]
    assert not second.new_requests and [c.new_block_ids for c in second.cached_requests] == [[]]
    assert [c.new_block_ids for c in fourth.cached_requests] == [[2]]  # position 8 starts a third block
    assert runner.outputs[-1].num_scheduled_tokens == {"a": 1}


def test_drafts_accepted_in_part_advance_only_over_accepted_tokens(tokenizer):
    runner = FakeRunner(num_drafts=4, num_right={"a": 2})
    core = make_core(tokenizer, runner, block_size=4)
    a = add(core, "a", 5, max_tokens=20)
    core.step()  # the prompt: one token, and 4 drafts of which 2 are right
    assert a.spec_token_ids and a.num_computed_tokens == 5
    core.step()
    assert runner.outputs[-1].draft_token_ids["a"][:2] == expected_tokens(a.output_token_ids[0], 2)
    assert a.output_token_ids == expected_tokens(14, 4)  # 1, then 2 accepted drafts and the target's own token
    assert (a.num_draft_tokens, a.num_accepted_tokens) == (4, 2)
    assert a.num_computed_tokens == a.num_tokens - 1  # the rejected drafts' slots are rolled back
    run(core)
    assert a.output_token_ids == expected_tokens(14, 20)


def test_the_prefix_cache_never_holds_a_block_hashed_over_rejected_drafts(tokenizer):
    runner = FakeRunner(num_drafts=3, num_right={"a": 1})
    core = make_core(tokenizer, runner, block_size=2)
    a = add(core, "a", 3, max_tokens=12)
    chains = []
    while core.has_unfinished():
        core.step()
        tokens = a.all_token_ids
        parent, chain = None, set()
        for i in range(len(tokens) // 2):
            parent = hash_block(parent, tokens[2 * i : 2 * i + 2])
            chain.add(parent)
        chains.append(chain)
        assert set(core.kv_cache.pool.cached) <= chain  # every cached block is a prefix of the real tokens
    assert len(core.kv_cache.pool.cached) >= 6


@pytest.mark.parametrize("stop", ["max_tokens", "stop_token", "eos"])
def test_a_stop_inside_an_accepted_run_drops_the_tokens_after_it(tokenizer, stop):
    runner = FakeRunner(num_drafts=4)  # every draft right: 5 tokens a step
    core = make_core(tokenizer, runner)
    want = expected_tokens(11, 30)
    params = {"max_tokens": {"max_tokens": 7}, "stop_token": {"stop_token_ids": [want[8]]},
              "eos": {}}[stop]
    if stop == "eos":
        core.output_processor.eos_token_ids = {want[12]}
    a = add(core, "a", 2, **params)
    run(core)
    length = {"max_tokens": 7, "stop_token": 9, "eos": 13}[stop]
    assert a.output_token_ids == want[:length]
    assert a.finish_reason.value == ("length" if stop == "max_tokens" else "stop")
    assert max(len(so.draft_token_ids.get("a", [])) for so in runner.outputs) == 4
    if stop == "max_tokens":  # never verifies drafts past what it may still generate
        assert all(len(so.draft_token_ids.get("a", [])) <= 7 - 1 - n for so, n in zip(runner.outputs, (0, 1, 6)))
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks


def test_speculation_backs_off_when_decode_rows_exceed_the_budget(tokenizer):
    runner = FakeRunner(num_drafts=4)
    core = make_core(tokenizer, runner, max_num_spec_rows=8)
    requests = [add(core, f"r{i}", 3, max_tokens=10) for i in range(6)]
    core.step()  # prefills
    core.step()
    so = runner.outputs[-1]
    assert sum(len(d) for d in so.draft_token_ids.values()) == 8 - 6  # 6 decode rows leave room for 2 drafts
    assert so.propose_drafts
    run(core)
    assert all(r.output_token_ids == expected_tokens(12, 10) for r in requests)


def test_no_drafts_are_asked_for_when_the_batch_is_past_the_budget(tokenizer):
    runner = FakeRunner(num_drafts=4)
    core = make_core(tokenizer, runner, max_num_spec_rows=4)
    for i in range(6):
        add(core, f"r{i}", 3, max_tokens=5)
    run(core)
    assert not any(so.propose_drafts or so.draft_token_ids for so in runner.outputs)


def test_finished_and_preempted_requests_are_named_to_the_runner(tokenizer):
    runner = FakeRunner()
    core = make_core(tokenizer, runner, num_blocks=4, block_size=4)
    add(core, "a", 7, max_tokens=3)
    add(core, "b", 7, first=40, max_tokens=3)  # no shared prefix: admitted in a's step
    run(core)
    named = set().union(*(so.finished_request_ids for so in runner.outputs))
    assert "b" in named and core.scheduler.num_preemptions > 0  # b was preempted when a grew
    add(core, "c", 3, max_tokens=2)
    run(core)
    assert set(runner.tokens) == {"c"}  # a and b were dropped when named
