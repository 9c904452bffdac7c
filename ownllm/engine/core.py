"""EngineCore: one step = pick the requests to advance -> run the model -> append tokens -> stop checks.

No batching scheduler yet: every unfinished request advances each step, a prefill computing its
whole prompt in one go and a decode one token. Token-level stopping (EOS, stop token ids,
max_tokens, the context limit) is decided here; stop strings are the output processor's.
The runner is anything with `execute(requests, num_tokens, stop_ids)` and `free(request_id)`.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ownllm.request import FinishReason, Request, RequestStatus


class Runner(Protocol):
    def execute(self, requests: list[Request], num_tokens: list[int], stop_ids: list[set[int]]) -> list: ...

    def free(self, request_id: str) -> None: ...


class EngineCore:
    def __init__(self, runner: Runner, eos_token_ids: Sequence[int], max_model_len: int) -> None:
        self.runner = runner
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

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return sum(r.status is RequestStatus.WAITING for r in self.requests.values())

    def stats(self) -> dict[str, float]:
        return {
            "num_running": sum(r.status is RequestStatus.RUNNING for r in self.requests.values()),
            "num_waiting": self.num_waiting,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.num_generation_tokens_total,
        }

    def _stop_ids(self, request: Request) -> set[int]:
        params = request.sampling_params
        ids = set(params.stop_token_ids)
        return ids if params.ignore_eos else ids | self.eos_token_ids

    def step(self) -> list[tuple[Request, object]]:
        """Advances every unfinished request by one token -> (request, sample result) pairs."""
        batch = list(self.requests.values())
        if not batch:
            return []
        for request in batch:
            request.status = RequestStatus.RUNNING
        num_tokens = [r.num_tokens - r.num_computed_tokens for r in batch]
        results = self.runner.execute(batch, num_tokens, [self._stop_ids(r) for r in batch])
        for request, n, result in zip(batch, num_tokens, results):
            self.num_prompt_tokens_total += max(0, min(request.num_prompt_tokens - request.num_computed_tokens, n))
            self.num_generation_tokens_total += 1
            request.num_computed_tokens += n
            request.output_token_ids.append(result.token_id)
            self._check_stop(request)
        return list(zip(batch, results))

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
            del self.requests[request_id]
            self.runner.free(request_id)
