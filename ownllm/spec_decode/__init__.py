"""Speculative decoding: proposers that draft tokens for the target model to verify in one forward.

A proposer is anything with `propose(states) -> {request id: draft token ids}` (called after each step with
the requests that just sampled, their tokens already extended; each state's draft_length.next says how many
it wants) and `free(request_id)`. The runner verifies
the drafts next step; the scheduler decides how many it may verify. Methods are chosen by name from
SpeculativeConfig: ngram (prompt lookup, plain Python) and draft_model (a small model with the same
vocabulary and its own paged KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ownllm.config import SpeculativeConfig

if TYPE_CHECKING:
    from ownllm.loader import Checkpoint
    from ownllm.worker.model_runner import ModelRunner, RequestState


@dataclass
class DraftLength:
    """How many tokens to draft for one request next, adapted to how its drafts fare, so speculation backs off
    where drafts miss (free text) and runs long where they hit (copied code). It doubles after a step that
    accepted every draft, and falls to one past the accepted ones after a miss; after PATIENCE steps in a row
    that accepted nothing, the request drafts nothing for PAUSE steps, then tries one token."""

    PATIENCE = 3
    PAUSE = 8
    max_tokens: int
    current: int = 0
    misses: int = 0  # verified steps in a row that accepted nothing
    paused: int = 0  # steps left without drafting

    def __post_init__(self) -> None:
        self.current = self.current or self.max_tokens

    @property
    def next(self) -> int:
        return 0 if self.paused else self.current

    def update(self, num_drafts: int, num_accepted: int) -> None:
        if self.paused:
            self.paused -= 1
            self.current = 1
            return
        if not num_drafts:
            return
        if num_accepted == num_drafts:
            self.current = min(self.max_tokens, 2 * self.current)
        else:
            self.current = num_accepted + 1
        self.misses = self.misses + 1 if num_accepted == 0 else 0
        if self.misses >= self.PATIENCE:
            self.paused, self.misses = self.PAUSE, 0


class Proposer(Protocol):
    def propose(self, states: list["RequestState"]) -> dict[str, list[int]]: ...

    def free(self, request_id: str) -> None: ...


def build_proposer(config: SpeculativeConfig, runner: "ModelRunner", checkpoint: "Checkpoint") -> Proposer:
    if config.method == "ngram":
        from ownllm.spec_decode.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "draft_model":
        from ownllm.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer(config, runner, checkpoint)
    raise ValueError(f"speculative method {config.method!r} is not available yet: use ngram or draft_model "
                     "(DeepSeek-V3's MTP layers are still skipped at load)")
