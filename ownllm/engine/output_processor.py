"""Turns sampled token ids into what users see: incremental text, stop strings, logprobs.

One RequestState per request keeps its detokenizer and accumulated output. Text that might be the
start of a stop string is held back from outputs until it is known not to be one, so a stop string
spanning tokens is never half-shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from ownllm.outputs import CompletionOutput, Logprob
from ownllm.request import FinishReason, Request
from ownllm.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop, held_back_len


@dataclass
class RequestState:
    request: Request
    index: int  # which of the n samples
    detokenizer: IncrementalDetokenizer
    text: str = ""  # all decoded text (may end in held-back characters)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(self, request: Request, index: int = 0) -> None:
        params = request.sampling_params
        self.states[request.request_id] = RequestState(
            request, index, self.tokenizer.detokenizer(params.skip_special_tokens),
            logprobs=[] if params.logprobs is not None else None,
        )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def process(self, request: Request, result) -> None:
        """Folds in one sampled token: logprobs, text, and a stop string that may end the request."""
        state = self.states[request.request_id]
        params = request.sampling_params
        state.cumulative_logprob += result.logprob
        if state.logprobs is not None:
            entry = {result.token_id: Logprob(result.logprob, result.rank, self._token_text(result.token_id))}
            for rank, (token_id, logprob) in enumerate(result.top_logprobs or [], start=1):
                entry.setdefault(token_id, Logprob(logprob, rank, self._token_text(token_id)))
            state.logprobs.append(entry)
        stopped_by_token = request.finish_reason is FinishReason.STOP  # a stop token is not part of the text
        start = len(state.text)
        if not stopped_by_token:
            state.text += state.detokenizer.push(result.token_id)
        if request.is_finished:
            state.text += state.detokenizer.flush()
        if params.stop and not stopped_by_token:
            at = find_stop(state.text, params.stop, start)
            if at >= 0:
                stop = next(s for s in params.stop if state.text.startswith(s, at))
                state.text = state.text[: at + (len(stop) if params.include_stop_str_in_output else 0)]
                request.finish(FinishReason.STOP, stop)

    def completion(self, request_id: str) -> CompletionOutput:
        """The output so far. While running, text that may be the start of a stop string is held back,
        so successive completions' texts only ever extend each other."""
        state = self.states[request_id]
        request = state.request
        reason = request.finish_reason
        text = state.text
        if not request.is_finished and request.sampling_params.stop:
            text = text[: len(text) - held_back_len(text, request.sampling_params.stop)]
        return CompletionOutput(
            index=state.index,
            text=text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=state.cumulative_logprob,
            logprobs=state.logprobs,
            finish_reason=reason.value if reason else None,
            stop_reason=request.stop_reason,
        )

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)
