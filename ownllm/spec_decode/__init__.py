"""Speculative decoding: proposers that draft tokens for the target model to verify in one forward.

A proposer is anything with `propose(states) -> {request id: draft token ids}` (called after each step with
the requests that just sampled, their tokens already extended) and `free(request_id)`. The runner verifies
the drafts next step; the scheduler decides how many it may verify. Methods are chosen by name from
SpeculativeConfig: ngram (prompt lookup, plain Python) and draft_model (a small model with the same
vocabulary and its own paged KV cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ownllm.config import SpeculativeConfig

if TYPE_CHECKING:
    from ownllm.loader import Checkpoint
    from ownllm.worker.model_runner import ModelRunner, RequestState


class Proposer(Protocol):
    def propose(self, states: list["RequestState"]) -> dict[str, list[int]]: ...

    def free(self, request_id: str) -> None: ...


def build_proposer(config: SpeculativeConfig, runner: "ModelRunner", checkpoint: "Checkpoint") -> Proposer:
    if config.method == "ngram":
        from ownllm.spec_decode.ngram import NgramProposer

        return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "draft_model":
        from ownllm.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer(config, runner, checkpoint)
    raise ValueError(f"speculative method {config.method!r} is not available yet: use ngram or draft_model "
                     "(DeepSeek-V3's MTP layers are still skipped at load)")
