"""Scheduler: continuous batching under a per-step token budget, with chunked prefill and preemption.

Prefill and decode are not modes: every request has tokens it has not computed yet (its whole
prompt at first, one token once decoding), and each step gives running requests, then waiting ones,
as many of those tokens as the budget allows. When the KV cache runs out of blocks, the most
recently admitted running request is preempted: its blocks are freed and it waits to be recomputed
(its prefix-cache blocks usually survive, so that is cheap). Waiting requests are admitted by
(priority, arrival), lower priority values first. Plain Python: imports no torch.
"""

from __future__ import annotations

from ownllm.config import SchedulerConfig
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.outputs import SchedulerOutput
from ownllm.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.waiting.sort(key=lambda r: (r.priority, r.arrival_time))

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if self._allocate_or_preempt(request, num_new, preempted):
                scheduled.append((request, num_new))
                budget -= num_new
                index += 1
            else:
                break  # the request preempted itself: nothing more fits
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        return SchedulerOutput(
            requests=[r for r, _ in scheduled],
            num_tokens=[n for _, n in scheduled],
            block_tables=[self.kv_cache.block_ids(r.request_id) for r, _ in scheduled],
            samples=[r.num_computed_tokens + n >= r.num_tokens for r, n in scheduled],
            preempted_ids=[r.request_id for r in preempted],
        )

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        while not self.kv_cache.allocate(request.request_id, request.num_computed_tokens + num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self.waiting.append(request)
        self.waiting.sort(key=lambda r: (r.priority, r.arrival_time))

    def _admit_waiting(self, budget: int, scheduled: list[tuple[Request, int]]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            token_ids = request.all_token_ids
            cached_blocks, num_cached = self.kv_cache.find_cached_prefix(token_ids)
            num_new = min(len(token_ids) - num_cached, budget)
            if not self.kv_cache.allocate(request.request_id, num_cached + num_new, cached_blocks):
                break
            self.kv_cache.record_prefix_query(len(token_ids), num_cached)
            self.waiting.pop(0)
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new
        return budget

    def update(self, output: SchedulerOutput) -> None:
        """Advances each scheduled request's computed tokens and registers newly full blocks."""
        for request, num_new in zip(output.requests, output.num_tokens):
            request.num_computed_tokens += num_new
            self.kv_cache.cache_full_blocks(request.request_id, request.all_token_ids, request.num_computed_tokens)

    def finish(self, request: Request) -> None:
        """Removes a finished or aborted request and frees its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request.request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
