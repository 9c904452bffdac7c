"""Request: the one unit that flows through the engine, with explicit counters and its status.

Plain data, no torch, and control-plane only: the scheduler and the output processor read and advance
it; the model runner never sees it (it gets the step's plain data and keeps its own per-request state).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ownllm.multimodal import ImageInput
from ownllm.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # cancelled by the client
    ERROR = "error"  # the engine failed on this request (its error in Request.error)


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)  # identity, not field-by-field comparison
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify in its next step
    num_draft_tokens: int = 0  # drafts verified so far
    num_accepted_tokens: int = 0  # of which accepted
    error: str | None = None  # the name of the exception that failed it, when finish_reason is ERROR (its trace is logged)
    images: list[ImageInput] = field(default_factory=list)  # in prompt order, their placeholders never overlapping

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def image_spans(self) -> list[tuple[int, int, str]]:
        return [image.span for image in self.images]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def fail(self, error: Exception) -> None:
        self.finish(FinishReason.ERROR)
        self.error = type(error).__name__

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
