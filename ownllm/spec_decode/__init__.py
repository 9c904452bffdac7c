"""Speculative decoding: proposers that draft tokens for the target model to verify in one forward.

A proposer is anything with `propose(states) -> {request id: draft token ids}` (called after each step with
the requests that just sampled, their tokens already extended; each state's draft_length.next says how many
it wants) and `free(request_id)`. The runner verifies
the drafts next step; the scheduler decides how many it may verify. Methods are chosen by name from
SpeculativeConfig: ngram (prompt lookup, plain Python), draft_model (a small model with the same
vocabulary and its own paged KV cache) and mtp (DeepSeek-V3's multi-token-prediction layer). A proposer whose
`reads_hidden_states` is true also has `observe(scheduled, hidden)`, which the runner calls after every step with
the target's hidden states before its final norm.
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
    """How many tokens to draft for one request next: the number that maximizes expected tokens per unit of
    time, from the request's own acceptance rate so far and what a draft costs (cost_per_draft: a drafted
    token's time over a target step's, about 0 for prompt lookup and the size ratio for a draft model). A
    draft is accepted with rate a, so k drafts yield (1 - a^(k+1)) / (1 - a) tokens a step, for 1 + k * cost
    of the time. Where no k pays (drafts that miss, or a draft model too slow for the acceptance), the request
    stops drafting for PAUSE steps, then probes with at least one token so its rate keeps up to date."""

    PAUSE = 8
    DECAY = 0.8  # weight of the past in the acceptance counts
    max_tokens: int
    cost_per_draft: float = 0.0
    accepted: float = 2.0  # decayed counts of accepted and rejected drafts; the prior: a = 2/3
    rejected: float = 1.0
    paused: int = 0  # steps left without drafting
    probing: bool = False  # the step after a pause drafts at least one token

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    @property
    def next(self) -> int:
        if self.paused:
            return 0
        a, cost = min(self.acceptance_rate, 0.999), self.cost_per_draft
        gains = [(1 - a ** (k + 1)) / (1 - a) / (1 + k * cost) for k in range(self.max_tokens + 1)]
        best = max(range(len(gains)), key=lambda k: (gains[k], -k))
        return max(best, 1) if self.probing else best

    def update(self, num_drafts: int, num_accepted: int) -> None:
        if self.paused:
            self.paused -= 1
            self.probing = self.paused == 0
            return
        if num_drafts:
            self.probing = False
            self.accepted = self.DECAY * self.accepted + num_accepted
            self.rejected = self.DECAY * self.rejected + (num_accepted < num_drafts)
        if self.next == 0:
            self.paused = self.PAUSE
            self.accepted, self.rejected = 1.0, 1.0  # the probe after the pause starts at a = 1/2


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
    from ownllm.spec_decode.mtp import MTPProposer

    return MTPProposer(config, runner, checkpoint)
