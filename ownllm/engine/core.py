"""EngineCore: one step = schedule -> run the model -> append sampled tokens -> token-level stop checks.

Token-level stopping (EOS, stop token ids, max_tokens, the context limit) is decided here; stop
strings are the output processor's. The runner is anything with `execute(SchedulerOutput)` ->
{request_id: sample result} and `free(request_id)`; the core never touches a tensor.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from ownllm.config import SchedulerConfig
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.engine.scheduler import Scheduler
from ownllm.outputs import SchedulerOutput
from ownllm.request import FinishReason, Request


class Runner(Protocol):
    def execute(self, output: SchedulerOutput) -> dict[str, Any]: ...

    def free(self, request_id: str) -> None: ...


class EngineCore:
    def __init__(
        self, runner: Runner, kv_cache: KVCacheManager, eos_token_ids: Sequence[int], max_model_len: int,
        scheduler_config: SchedulerConfig | None = None,
    ) -> None:
        self.runner = runner
        self.kv_cache = kv_cache
        self.scheduler = Scheduler(scheduler_config or SchedulerConfig(), kv_cache)
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    def add_request(self, request: Request) -> None:
        if not request.prompt_token_ids:
            raise ValueError("the prompt is empty")
        if request.num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"the prompt has {request.num_prompt_tokens} tokens but the model's context is "
                f"{self.max_model_len} tokens (room is needed for at least one new token)"
            )
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def stats(self) -> dict[str, float]:
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
        }

    def _stop_ids(self, request: Request) -> set[int]:
        params = request.sampling_params
        ids = set(params.stop_token_ids)
        return ids if params.ignore_eos else ids | self.eos_token_ids

    def step(self) -> list[tuple[Request, Any]]:
        """Runs one scheduled batch -> (request, sample result) for each request that got a new token."""
        output = self.scheduler.schedule()
        if not output.requests:
            return []
        results = self.runner.execute(output)
        self.scheduler.update(output)
        sampled = []
        for request, num_new in zip(output.requests, output.num_tokens):
            self.num_prompt_tokens_total += max(0, min(num_new, request.num_prompt_tokens - (request.num_computed_tokens - num_new)))
            result = results.get(request.request_id)
            if result is None:
                continue
            request.output_token_ids.append(result.token_id)
            self.num_generation_tokens_total += 1
            self._check_stop(request)
            sampled.append((request, result))
        return sampled

    def _check_stop(self, request: Request) -> None:
        params, token_id = request.sampling_params, request.output_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens and token_id in self._stop_ids(request):
            reason = token_id if token_id in params.stop_token_ids else None
            request.finish(FinishReason.STOP, reason)
        elif params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            request.finish(FinishReason.LENGTH)
        elif request.num_tokens >= self.max_model_len:
            request.finish(FinishReason.LENGTH)

    def finish(self, request_id: str, reason: FinishReason = FinishReason.ABORT, stop_reason: str | None = None) -> None:
        """Ends a request early (abort, or a stop string found downstream) and frees what it holds."""
        request = self.requests.get(request_id)
        if request is not None and not request.is_finished:
            request.finish(reason, stop_reason)
        self.release_finished()

    def release_finished(self) -> None:
        for request_id in [rid for rid, r in self.requests.items() if r.is_finished]:
            self.scheduler.finish(self.requests.pop(request_id))
            self.runner.free(request_id)
