"""EngineCore: one step = schedule -> run the model -> fold in the sampled tokens -> release finished requests.

The executor is anything with `execute_model(SchedulerOutput) -> RunnerOutput` (distributed/executor.py: the
model runner in this process, or tensor-parallel worker processes): plain data in and out, so the core never
touches a tensor. After each step the scheduler advances counters over accepted tokens only, the output
processor appends the tokens and decides every stop, and the drafts the runner proposed wait, trimmed to what
the request may still generate, for the next step. A lost tensor-parallel worker (ExecutorDeadError) ends the
step with that error. A step that raises is rerun one request at a time (engine/fault_isolation.py): only the request whose own work
raises ends, with FinishReason.ERROR; the others carry on.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Sequence

from ownllm.config import SchedulerConfig
from ownllm.distributed.executor import Executor, ExecutorDeadError
from ownllm.engine.fault_isolation import execute_one_by_one
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.engine.output_processor import OutputProcessor
from ownllm.engine.scheduler import Scheduler
from ownllm.engine.structured_output import StructuredOutputManager
from ownllm.outputs import RunnerOutput, SchedulerOutput
from ownllm.request import FinishReason, Request
from ownllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self, executor: Executor, kv_cache: KVCacheManager, tokenizer: Tokenizer, max_model_len: int,
        scheduler_config: SchedulerConfig | None = None, num_lookahead_tokens: int = 0,
        eos_token_ids: Sequence[int] | None = None, spec_method: str | None = None,
        structured_output: StructuredOutputManager | None = None,
    ) -> None:
        self.executor = executor
        self.kv_cache = kv_cache
        self.scheduler = Scheduler(scheduler_config or SchedulerConfig(), kv_cache, num_lookahead_tokens)
        eos = tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids
        self.output_processor = OutputProcessor(tokenizer, eos, max_model_len)
        self.structured_output = structured_output or StructuredOutputManager(tokenizer.vocab_size)
        self.max_model_len = max_model_len
        self.spec_method = spec_method  # the speculative decoding method, for the metrics' label
        self.requests: dict[str, Request] = {}
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_sampling_steps_total = 0  # request-steps that sampled
        self.num_draft_tokens_total = 0
        self.num_accepted_tokens_total = 0

    def add_request(self, request: Request) -> None:
        """Queues a request whose output state the caller has added to output_processor."""
        if not request.prompt_token_ids:
            raise ValueError("the prompt is empty")
        if request.num_prompt_tokens >= self.max_model_len:
            of_images = sum(image.length for image in request.images)
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens"
                + (f" ({of_images} of them for its {_images(len(request.images))})" if request.images else "")
                + f" but the model's context is {self.max_model_len} tokens (room is needed for at least one new token)"
            )
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        max_rows = self.scheduler.config.max_num_encoder_tokens
        max_tokens = self.scheduler.config.max_num_batched_tokens
        for image in request.images:
            if image.length > max_rows:
                raise ValueError(f"an image takes {image.length} tokens, more than the encoder budget of a step "
                                 f"(max_num_encoder_tokens {max_rows})")
            if image.indivisible and image.length > max_tokens:
                raise ValueError(f"an image takes {image.length} tokens, which this model computes in one step, but "
                                 f"a step computes at most {max_tokens} tokens (--max-num-batched-tokens)")
        self.structured_output.add(request)  # refuses a grammar it cannot compile
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def stats(self) -> dict[str, float | str | None]:
        kv = self.kv_cache
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_blocks_total": kv.num_blocks,
            "kv_blocks_used": kv.num_blocks - kv.num_free_blocks,
            "prefix_cache_queries": kv.num_query_tokens,
            "prefix_cache_hits": kv.num_hit_tokens,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.num_generation_tokens_total,
            "spec_decode_method": self.spec_method,
            "spec_decode_draft_tokens_total": self.num_draft_tokens_total,
            "spec_decode_accepted_tokens_total": self.num_accepted_tokens_total,
            "spec_decode_sampling_steps_total": self.num_sampling_steps_total,
        }

    def step(self) -> list[Request]:
        """Runs one scheduled batch -> the requests that got new tokens or failed (finished ones included).
        A fault fails only the requests it belongs to (see fault_isolation); the others go on."""
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.num_scheduled_tokens:
            return []
        scheduler_output.allowed_token_bitmask = self.structured_output.bitmask_async(scheduler_output, self.requests)
        runner_output, failed = self._execute(scheduler_output)
        progressed = []
        for request_id, error in failed.items():
            self.requests[request_id].fail(error)
            progressed.append(self.requests[request_id])
        for i, request_id in enumerate(runner_output.request_ids):
            request = self.requests[request_id]
            try:
                if self._update(request, scheduler_output, runner_output, i):
                    progressed.append(request)
            except Exception as error:  # a bug in folding in one request's tokens ends that request alone
                logger.error("request %s failed after its step", request_id, exc_info=error)
                request.fail(error)
                progressed.append(request)
        self.release_finished()
        return progressed

    def _execute(self, so: SchedulerOutput) -> tuple[RunnerOutput, dict[str, Exception]]:
        try:
            return self.executor.execute_model(so), {}
        except ExecutorDeadError:  # a lost tensor-parallel worker: nothing can run any more
            raise
        except Exception as error:
            if isinstance(so.allowed_token_bitmask, Future):
                so.allowed_token_bitmask.exception()  # the retries fill masks of their own: let this one finish
            logger.warning("a step of %d requests failed (%s: %s); running them one at a time",
                           len(so.num_scheduled_tokens), type(error).__name__, error)
            return execute_one_by_one(self.executor, so, self.requests, self.kv_cache,
                                      lambda alone: self.structured_output.bitmask(alone, self.requests))

    def _update(self, request: Request, so: SchedulerOutput, runner_output: RunnerOutput, i: int) -> bool:
        """Folds one request's step results in -> whether it got tokens."""
        request_id = request.request_id
        num_scheduled = so.num_scheduled_tokens[request_id]
        num_drafts = len(so.draft_token_ids.get(request_id, ()))
        num_accepted = runner_output.num_accepted_draft_tokens[i]
        num_prompt_left = request.num_prompt_tokens - request.num_computed_tokens
        self.num_prompt_tokens_total += max(0, min(num_scheduled, num_prompt_left))
        self.scheduler.advance(request, num_scheduled, num_drafts, num_accepted)
        if request_id in runner_output.prompt_logprobs:
            self.output_processor.append_prompt_logprobs(request, *runner_output.prompt_logprobs[request_id])
        token_ids = runner_output.sampled_token_ids[i]
        if token_ids:
            num_before = request.num_output_tokens
            self.output_processor.append(request, token_ids, runner_output.logprobs[i])
            self.structured_output.advance(request_id, request.output_token_ids[num_before:])
            self.num_generation_tokens_total += request.num_output_tokens - num_before
            self.num_sampling_steps_total += 1
            self.num_draft_tokens_total += num_drafts
            self.num_accepted_tokens_total += num_accepted
        self.scheduler.cache_blocks(request)
        if not request.is_finished:
            request.spec_token_ids = self._trim_drafts(request, runner_output.draft_token_ids.get(request_id, []))
        return bool(token_ids)

    def _trim_drafts(self, request: Request, draft_token_ids: list[int]) -> list[int]:
        """Drafts past what the request may still generate would be verified for nothing; a constrained request
        takes none."""
        if self.structured_output.is_constrained(request.request_id):
            return []
        room = self.max_model_len - request.num_tokens
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens)
        return draft_token_ids[: max(room - 1, 0)]

    def finish(self, request_id: str, reason: FinishReason = FinishReason.ABORT, stop_reason: str | None = None) -> None:
        """Ends a request early (an abort) and frees what it holds."""
        request = self.requests.get(request_id)
        if request is not None and not request.is_finished:
            request.finish(reason, stop_reason)
        self.release_finished()

    def release_finished(self) -> None:
        for request_id in [rid for rid, r in self.requests.items() if r.is_finished]:
            self.scheduler.finish(self.requests.pop(request_id))
            self.structured_output.remove(request_id)


def _images(count: int) -> str:
    return f"{count} image" + ("" if count == 1 else "s")
