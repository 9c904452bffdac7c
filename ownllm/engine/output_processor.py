"""Turns sampled tokens into what users see, and decides every stop: the one place where EOS, stop token ids,
max_tokens, the context limit and stop strings end a request.

Tokens arrive a step at a time, one or several per request (accepted drafts), and are folded in one at a
time, so a stop in the middle of an accepted run drops the tokens after it. One RequestState per request
keeps its detokenizer and accumulated output. Text that might be the start of a stop string is held back
from outputs until it is known not to be one, so a stop string spanning tokens is never half-shown.
Outputs are cumulative or deltas (what was added since the last output of that request).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ownllm.outputs import CompletionOutput, Logprob, SampleLogprobs
from ownllm.request import FinishReason, Request
from ownllm.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop, held_back_len


@dataclass
class RequestState:
    request: Request
    index: int  # which of the n samples
    detokenizer: IncrementalDetokenizer
    stop_token_ids: frozenset[int]  # tokens that end it (once min_tokens are out): its stop ids and EOS
    text: str = ""  # all decoded text (may end in held-back characters)
    logprobs: list[dict[int, Logprob]] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # the first prompt token's is None
    has_sent_prompt_logprobs: bool = False
    cumulative_logprob: float = 0.0
    num_sent_tokens: int = 0  # what earlier delta outputs carried
    num_sent_chars: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Sequence[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.states: dict[str, RequestState] = {}

    def add(self, request: Request, index: int = 0) -> None:
        params = request.sampling_params
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        self.states[request.request_id] = RequestState(
            request, index, self.tokenizer.detokenizer(params.skip_special_tokens),
            frozenset(params.stop_token_ids) | eos, logprobs=[] if params.logprobs is not None else None,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _entry(self, token_id: int, sample: SampleLogprobs) -> dict[int, Logprob]:
        entry = {token_id: Logprob(sample.logprob, sample.rank, self._token_text(token_id))}
        for rank, (top_id, logprob) in enumerate(sample.top or [], start=1):
            entry.setdefault(top_id, Logprob(logprob, rank, self._token_text(top_id)))
        return entry

    def append(self, request: Request, token_ids: Sequence[int], logprobs: Sequence[SampleLogprobs]) -> None:
        """Folds in one step's tokens in order, up to the first that ends the request."""
        state = self.states[request.request_id]
        for token_id, sample in zip(token_ids, logprobs):
            request.output_token_ids.append(token_id)
            state.cumulative_logprob += sample.logprob
            if state.logprobs is not None:
                state.logprobs.append(self._entry(token_id, sample))
            self._check_stop(state, token_id)
            if request.is_finished:
                return

    def append_prompt_logprobs(self, request: Request, first: int, logprobs: Sequence[SampleLogprobs]) -> None:
        """Folds in the logprobs of prompt tokens first, first + 1, ...; those already known (a preempted request
        computes its prompt again) are kept."""
        known = self.states[request.request_id].prompt_logprobs
        for position, sample in enumerate(logprobs, start=first):
            if position == len(known):
                known.append(self._entry(request.prompt_token_ids[position], sample))

    def prompt_logprobs(self, request_id: str, delta: bool = False) -> list[dict[int, Logprob] | None] | None:
        """The prompt's logprobs once all are known (None before, or when not asked); with delta, only once."""
        state = self.states[request_id]
        known = state.prompt_logprobs
        if known is None or len(known) < state.request.num_prompt_tokens or (delta and state.has_sent_prompt_logprobs):
            return None
        state.has_sent_prompt_logprobs = True
        return known

    def _check_stop(self, state: RequestState, token_id: int) -> None:
        request, params = state.request, state.request.sampling_params
        stopped_by_token = request.num_output_tokens >= params.min_tokens and token_id in state.stop_token_ids
        if stopped_by_token:  # a stop token is not part of the text
            request.finish(FinishReason.STOP, token_id if token_id in params.stop_token_ids else None)
        elif params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            request.finish(FinishReason.LENGTH)
        elif request.num_tokens >= self.max_model_len:
            request.finish(FinishReason.LENGTH)
        start = len(state.text)
        if not stopped_by_token:
            state.text += state.detokenizer.push(token_id)
        if request.is_finished:
            state.text += state.detokenizer.flush()
        if params.stop and not stopped_by_token:
            at = find_stop(state.text, params.stop, start)
            if at >= 0:
                stop = next(s for s in params.stop if state.text.startswith(s, at))
                state.text = state.text[: at + (len(stop) if params.include_stop_str_in_output else 0)]
                request.finish(FinishReason.STOP, stop)

    def completion(self, request_id: str, delta: bool = False) -> CompletionOutput:
        """The output so far, or (delta) what was added since the last delta. While running, text that may be
        the start of a stop string is held back, so successive outputs' texts only ever extend each other."""
        state = self.states[request_id]
        request = state.request
        reason = request.finish_reason
        text_end = len(state.text)
        if not request.is_finished and request.sampling_params.stop:
            text_end -= held_back_len(state.text, request.sampling_params.stop)
        first_token, first_char = (state.num_sent_tokens, state.num_sent_chars) if delta else (0, 0)
        if delta:
            state.num_sent_tokens, state.num_sent_chars = request.num_output_tokens, text_end
        return CompletionOutput(
            index=state.index,
            text=state.text[first_char:text_end],
            token_ids=request.output_token_ids[first_token:],
            cumulative_logprob=state.cumulative_logprob,
            logprobs=state.logprobs[first_token:] if state.logprobs is not None else None,
            finish_reason=reason.value if reason else None,
            stop_reason=request.stop_reason,
        )

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)
