"""Property tests (hypothesis) of the scheduler over the KV-cache manager: random sequences of adds, steps
(with drafts, partly accepted), aborts and finishes on a pool small enough that requests are preempted often,
and prompts from a 3-token alphabet so that prefixes are shared and cached blocks revived. After every action
no block is leaked or freed twice, each block's ref count equals the number of requests holding it, the free
queue holds exactly the unreferenced blocks, and when everything has ended every block is free again."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ownllm.config import SchedulerConfig
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.engine.scheduler import Scheduler
from ownllm.request import FinishReason, Request, RequestStatus
from ownllm.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_BLOCKS = 12


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=True)
        self.scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4, max_num_spec_rows=4),
                                   self.kv)
        self.live: list[Request] = []
        self.num_added = 0

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=3 * BLOCK_SIZE), max_tokens=st.integers(1, 8),
          priority=st.integers(0, 1))
    def add(self, prompt, max_tokens, priority):
        request = Request(f"r{self.num_added}", prompt, SamplingParams(max_tokens=max_tokens), priority=priority)
        self.num_added += 1
        self.scheduler.add(request)
        self.live.append(request)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def step(self, data):
        """One step with a fake model: drafts proposed for decoding requests, a random number of them accepted."""
        for request in self.scheduler.running:
            request.spec_token_ids = data.draw(st.lists(st.integers(0, 2), max_size=3), label="drafts")
        out = self.scheduler.schedule()
        by_id = {r.request_id: r for r in self.scheduler.running}
        for request_id, num_scheduled in out.num_scheduled_tokens.items():
            request = by_id[request_id]
            drafts = out.draft_token_ids.get(request_id, [])
            num_accepted = data.draw(st.integers(0, len(drafts)), label="accepted")
            samples = request.num_computed_tokens + num_scheduled - len(drafts) >= request.num_tokens
            self.scheduler.advance(request, num_scheduled, len(drafts), num_accepted)
            if samples:
                request.output_token_ids += drafts[:num_accepted] + [data.draw(st.integers(0, 2), label="token")]
                if request.num_output_tokens >= request.sampling_params.max_tokens:
                    request.finish(FinishReason.LENGTH)
            self.scheduler.cache_blocks(request)
            request.spec_token_ids = []
        self._release_finished()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        request = data.draw(st.sampled_from(self.live), label="aborted")
        request.finish(FinishReason.ABORT)
        self._release_finished()

    def _release_finished(self) -> None:
        for request in [r for r in self.live if r.is_finished]:
            self.scheduler.finish(request)
            self.live.remove(request)

    @invariant()
    def ref_counts_equal_holders(self):
        holders = Counter(block.block_id for blocks in self.kv.req_blocks.values() for block in blocks)
        for blocks in self.kv.req_blocks.values():
            assert len({b.block_id for b in blocks}) == len(blocks), "a request holds a block twice"
        for block in self.kv.pool.blocks:
            assert block.ref_cnt == holders[block.block_id], f"block {block.block_id}"
        assert set(self.kv.pool.free_queue) == {b.block_id for b in self.kv.pool.blocks if b.ref_cnt == 0}
        for block_hash, block in self.kv.pool.cached.items():
            assert block.block_hash == block_hash

    @invariant()
    def only_running_requests_hold_blocks(self):
        running = {r.request_id for r in self.scheduler.running}
        assert set(self.kv.req_blocks) <= running
        for request in self.scheduler.running:
            assert request.status is RequestStatus.RUNNING
            assert len(self.kv.req_blocks[request.request_id]) * BLOCK_SIZE >= request.num_computed_tokens
        assert {r.request_id for r in self.scheduler.waiting} | running == {r.request_id for r in self.live}

    def teardown(self):
        for request in list(self.live):
            request.finish(FinishReason.ABORT)
        self._release_finished()
        assert self.kv.num_free_blocks == NUM_BLOCKS and not self.kv.req_blocks
        assert not self.scheduler.running and not self.scheduler.waiting and not self.scheduler._num_sent_blocks


SchedulerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_scheduler_and_kv_cache_keep_their_invariants = SchedulerMachine.TestCase

