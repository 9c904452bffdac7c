"""Scheduler: continuous batching under a per-step token budget, with chunked prefill, preemption and
draft tokens to verify.

Prefill and decode are not modes: every request has tokens it has not computed yet (its whole
prompt at first, one token once decoding, plus the drafts it verifies), and each step gives running
requests, then waiting ones, as many of those tokens as the budget allows. When the KV cache runs out
of blocks, the most recently admitted running request is preempted: its blocks are freed and it waits
to be recomputed (its prefix-cache blocks usually survive, so that is cheap). Waiting requests are
admitted by (priority, arrival), lower priority values first, except that a request whose next uncached block
a request admitted before it computes in the same step waits one step, then finds that block in the prefix
cache (SGLang's in-batch prefix caching): clients that send one system prompt at once compute it once.

Speculation backs off under load: a step verifies drafts only while its decode rows (one per decoding
request plus its drafts) stay within `max_num_spec_rows`, the batch size up to which decoding is bound
by reading the weights, so extra rows are nearly free; beyond it they would cost compute.

Images: a step that reaches an image's placeholder tokens needs its encoder output. An image not yet held
(engine/encoder_cache.py) is encoded that step if the step's encoder budget (max_num_encoder_tokens rows) and
the encoder cache have room; otherwise the request's chunk stops before the image, and the image waits for a
later step. Chunks may end inside an image: the runner writes the slice of its rows each step covers; except
an indivisible one (Gemma 3's, whose tokens attend each other both ways): a chunk stops before it, or, when it starts
the chunk, takes it whole if what is left of the step's token budget holds it, else waits for a step whose does (the
engine refuses an image longer than the whole budget, so one always comes); a chunk that starts inside it, after a
prefix-cache hit, is right too: the cached part was computed with the whole image. No step goes past its budget.

It emits the step as plain data (outputs.SchedulerOutput) and learns what happened from a RunnerOutput:
counters advance, and blocks are hashed into the prefix cache, only over accepted tokens; the slots of
rejected drafts are rolled back. Plain Python: imports no torch.
"""

from __future__ import annotations

from ownllm.config import SchedulerConfig
from ownllm.engine.encoder_cache import EncoderCacheManager
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from ownllm.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, num_lookahead_tokens: int = 0) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.num_lookahead_tokens = num_lookahead_tokens  # slots a draft model writes past the verified tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self._num_sent_blocks: dict[str, int] = {}  # block ids the runner holds, per request
        self._finished_ids: set[str] = set()  # to tell the runner at the next step
        self.encoder_cache = EncoderCacheManager(config.encoder_cache_tokens)
        self._encoder_budget = 0  # rows the vision encoder may still compute this step

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.waiting.sort(key=lambda r: (r.priority, r.arrival_time))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.config.max_num_batched_tokens
        self._encoder_budget = self.config.max_num_encoder_tokens
        preempted: list[Request] = []
        spec_rows = self.config.max_num_spec_rows - sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_left = request.num_tokens - request.num_computed_tokens
            num_new, to_encode = self._plan_images(request, min(num_left, budget))
            if num_new == 0:  # stops before an image the encoder cannot take this step
                index += 1
                continue
            # drafts follow the last token, so only a decoding request (one token left) verifies them
            num_drafts = min(len(request.spec_token_ids), budget - num_new, max(spec_rows, 0)) if num_left == 1 else 0
            del request.spec_token_ids[num_drafts:]
            if not self._allocate_or_preempt(request, num_new + num_drafts, preempted):
                break  # the request preempted itself: nothing more fits
            self._encode(request, num_new, to_encode, out)
            if num_drafts:
                out.draft_token_ids[request.request_id] = list(request.spec_token_ids)
                spec_rows -= num_drafts
            self._schedule(request, num_new + num_drafts, out)
            budget -= num_new + num_drafts
            index += 1
        out.finished_request_ids |= {r.request_id for r in preempted}
        if not preempted:
            self._admit_waiting(budget, out)
        out.propose_drafts = len(self.running) < self.config.max_num_spec_rows
        out.freed_encoder_hashes = self.encoder_cache.take_freed()
        return out

    def _schedule(self, request: Request, num_new: int, out: SchedulerOutput, new: bool = False) -> None:
        block_ids = self.kv_cache.block_ids(request.request_id)
        request_id = request.request_id
        if new:
            out.new_requests.append(NewRequestData(
                request_id, request.prompt_token_ids, list(request.output_token_ids), request.sampling_params,
                block_ids, request.num_computed_tokens, request.images))
        else:
            sent = self._num_sent_blocks[request_id]
            out.cached_requests.append(CachedRequestData(request_id, block_ids[sent:], request.num_computed_tokens))
        self._num_sent_blocks[request_id] = len(block_ids)
        out.num_scheduled_tokens[request_id] = num_new

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        num_slots = request.num_computed_tokens + num_new + self.num_lookahead_tokens
        while not self.kv_cache.allocate(request.request_id, num_slots):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _plan_images(self, request: Request, num_new: int) -> tuple[int, list[int]]:
        """-> (tokens to compute, possibly fewer, so that every image they reach is held or encoded this step;
        indices of the images to encode). Changes nothing."""
        num_new = self._keep_whole(request, num_new)
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
        to_encode, num_rows = [], 0
        for index, image in enumerate(request.images):
            if image.offset >= end:
                break
            if image.end <= start or self.encoder_cache.has(image.image_hash):
                continue
            if any(request.images[i].image_hash == image.image_hash for i in to_encode):
                continue
            if num_rows + image.length > self._encoder_budget or not self.encoder_cache.can_add(num_rows + image.length):
                return max(image.offset - start, 0), to_encode
            to_encode.append(index)
            num_rows += image.length
        return num_new, to_encode

    @staticmethod
    def _keep_whole(request: Request, num_new: int) -> int:
        """num_new, lowered so that the chunk does not end inside an indivisible image: it stops before the image,
        or, where the image (or its uncached rest) starts the chunk and does not fit, the request waits (0)."""
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
        for image in request.images:
            if image.indivisible and image.offset < end < image.end:
                return image.offset - start if image.offset > start else 0
        return num_new

    def _encode(self, request: Request, num_new: int, to_encode: list[int], out: SchedulerOutput) -> None:
        """Commits a plan: references the held images the step reaches, records the ones to encode."""
        if not request.images:
            return
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
        for image in request.images:
            if image.offset < end and image.end > start and self.encoder_cache.has(image.image_hash):
                self.encoder_cache.use(request.request_id, image.image_hash)
        for index in to_encode:
            image = request.images[index]
            self.encoder_cache.add(request.request_id, image.image_hash, image.length)
            self._encoder_budget -= image.length
        if to_encode:
            out.encoder_inputs[request.request_id] = to_encode

    def _release_images(self, request: Request, computed_only: bool = False) -> None:
        images = [i for i in request.images if not computed_only or i.end <= request.num_computed_tokens]
        if images:
            self.encoder_cache.release(request.request_id, [i.image_hash for i in images])

    def _preempt(self, request: Request) -> None:
        self._release_images(request)
        self.kv_cache.free(request.request_id)
        self._num_sent_blocks.pop(request.request_id, None)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self.waiting.append(request)
        self.waiting.sort(key=lambda r: (r.priority, r.arrival_time))

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        computing: set[int] = set()  # hashes of the full blocks the requests admitted here compute this step
        index = 0
        while index < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[index]
            token_ids = request.all_token_ids
            hashes = self.kv_cache.lookup_hashes(token_ids, request.image_spans)
            cached_blocks, num_cached = self.kv_cache.find_cached_prefix(token_ids, request.image_spans, hashes)
            first_new = num_cached // self.kv_cache.block_size
            if request.sampling_params.prompt_logprobs is not None:  # each prompt token's logits are needed
                cached_blocks, num_cached = [], 0
            elif first_new < len(hashes) and hashes[first_new] in computing:
                index += 1  # its next block is computed this step by a request before it: a cache hit next step
                continue
            request.num_computed_tokens = num_cached
            num_new, to_encode = self._plan_images(request, min(len(token_ids) - num_cached, budget))
            if num_new == 0 or not self.kv_cache.allocate(request.request_id, num_cached + num_new, cached_blocks):
                request.num_computed_tokens = 0
                break
            self.kv_cache.record_prefix_query(len(token_ids), num_cached)
            computing.update(hashes[first_new : (num_cached + num_new) // self.kv_cache.block_size])
            self.waiting.pop(index)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._schedule(request, num_new, out, new=True)
            self._encode(request, num_new, to_encode, out)
            budget -= num_new

    def advance(self, request: Request, num_scheduled: int, num_drafts: int, num_accepted: int) -> None:
        """After a step: the request's computed tokens move past what it computed, less its rejected drafts
        (their slots are written over next step)."""
        request.num_computed_tokens += num_scheduled - (num_drafts - num_accepted)
        request.num_draft_tokens += num_drafts
        request.num_accepted_tokens += num_accepted
        self._release_images(request, computed_only=True)

    def cache_blocks(self, request: Request) -> None:
        """Registers the request's blocks now full of computed (so accepted) tokens in the prefix cache."""
        num_computed = min(request.num_computed_tokens, request.num_tokens)
        self.kv_cache.cache_full_blocks(request.request_id, request.all_token_ids, num_computed, request.image_spans)

    def finish(self, request: Request) -> None:
        """Removes a finished or aborted request and frees its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release_images(request)
        self.kv_cache.free(request.request_id)
        if self._num_sent_blocks.pop(request.request_id, None) is not None:
            self._finished_ids.add(request.request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
