"""Plain data that crosses the engine's seams: the step protocol between scheduler and runner, and the
results handed back to users (shaped like vLLM's so its users know them).

The step protocol carries no live object and no tensor: a SchedulerOutput says what one step computes
(new requests' data once, images' pixel values as numpy arrays among it; then per step only tokens to compute,
new block ids, draft tokens and the images to encode), a
RunnerOutput what it produced (0..k+1 sampled tokens per request, their logprobs, accepted drafts and
the drafts proposed for the next step). RequestOutput holds one CompletionOutput per sample (n);
logprobs, when asked for, are one {token_id: Logprob} dict per generated token holding the sampled
token and the top alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ownllm.compute.strategies import ComputeSummary
from ownllm.multimodal import ImageInput
from ownllm.sampling_params import SamplingParams


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the model's most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample's output: all of it so far, or (output_kind "delta") only what the last step added."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None  # set when the engine failed on this request (a sample's finish_reason is "error")
    # with prompt_logprobs asked: one entry per prompt token (None for the first, which nothing predicts), in
    # the first output once the prompt is computed (every later output too, unless output_kind is "delta")
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    compute: ComputeSummary | None = None  # a request with `compute`: how its one output was chosen


# ---- the step protocol


@dataclass
class NewRequestData:
    """A request the runner has not seen (or must recompute after preemption): everything it needs, sent once."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty when resumed after preemption
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # a prefix-cache hit starts past 0
    images: list[ImageInput] = field(default_factory=list)  # pixel values and placeholder positions


@dataclass
class CachedRequestData:
    """A request the runner already holds: its blocks added since last step and where its computation stands."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """What one engine step computes. num_scheduled_tokens gives, in batch order, each request's tokens computed
    this step from its num_computed_tokens on, draft tokens included. A request samples iff those tokens reach
    the end of its known tokens; with k drafts it then samples k+1 rows. Blocks cover the scheduler's lookahead
    slots past those tokens too, which a draft model writes while it proposes."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    finished_request_ids: set[str] = field(default_factory=set)  # finished, aborted or preempted since last step
    propose_drafts: bool = False  # whether drafts proposed now could be verified next step (few enough requests)
    # [num sampled rows, ceil(vocab / 32)] int32 bits of the tokens each row may sample (None: all), rows in
    # batch order; filled by a grammar backend, in the engine process as a Future that completes during the
    # forward (a runner in another process gets the array)
    allowed_token_bitmask: Any = None
    # images to run the vision encoder on this step: request id -> indices into its images, before the forward
    encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    freed_encoder_hashes: list[str] = field(default_factory=list)  # encoder outputs the runner may drop now

    @property
    def request_ids(self) -> list[str]:
        return list(self.num_scheduled_tokens)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass
class SampleLogprobs:
    """Logprobs of one sampled token in the raw model distribution (before penalties and temperature)."""

    logprob: float
    rank: int  # 1 = most likely; 0 when logprobs were not asked for
    top: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class RunnerOutput:
    """What one step produced, aligned with request_ids (the scheduler output's batch order).
    sampled_token_ids[i]: the accepted drafts then one sampled token (empty for a prompt chunk short of the end)."""

    request_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[SampleLogprobs]] = field(default_factory=list)
    num_accepted_draft_tokens: list[int] = field(default_factory=list)
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)  # proposals for the next step
    # request id -> (position of the first prompt token scored, logprobs of that token and the next ones)
    prompt_logprobs: dict[str, tuple[int, list[SampleLogprobs]]] = field(default_factory=dict)
