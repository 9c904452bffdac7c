"""Results handed back to users, shaped like vLLM's so its users know them.

RequestOutput holds one CompletionOutput per sample (n); logprobs, when asked for, are one
{token_id: Logprob} dict per generated token holding the sampled token and the top alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ownllm.request import Request


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the model's most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
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


@dataclass
class SchedulerOutput:
    """What one engine step computes: for each scheduled request, how many of its next tokens, in which blocks.

    A request samples a token this step iff its computed tokens then reach its total (`samples[i]`);
    a prefill chunk that stops short of the prompt's end only fills the KV cache."""

    requests: list["Request"]
    num_tokens: list[int]  # tokens computed this step, per request, starting at request.num_computed_tokens
    block_tables: list[list[int]]
    samples: list[bool]
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_tokens)
