"""ComputeParams: what a request asks of its extra inference compute (the `compute` request field), validated on
construction. Every error names the field as `compute.FIELD`, so the server can return it as the 400's param."""

from __future__ import annotations

from dataclasses import dataclass

from ownllm.compute.extractors import make_extractor

STRATEGIES = ("vote", "best_of")
SCORERS = ("logprob", "verifier")
DEFAULT_TEMPERATURE = 0.7  # when the request sets none: samples must differ for a vote to mean anything
DEFAULT_MAX_SAMPLES = 64


@dataclass(frozen=True)
class ComputeParams:
    strategy: str = "vote"
    samples: int = 8
    answer: str = "text"  # an extractor: number, boxed, choice, json:FIELD, regex:PATTERN or text
    scorer: str = "logprob"  # best_of only: mean token logprob, or a verifier's probability of "yes"
    early_stop: bool = False  # vote only: stop once the leader cannot be overtaken (or, below, is likely to stay)
    # early_stop: also stop once the leader wins the whole vote with at least this probability, predicted from the
    # answers so far (strategies.leader_win_probability; adaptive consistency, arXiv 2305.11860, stops on such a
    # probability); 1.0: only once it cannot be overtaken
    confidence: float = 1.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"compute.strategy must be vote or best_of, got {self.strategy!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"compute.samples must be at least 1, got {self.samples!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"compute.scorer must be logprob or verifier, got {self.scorer!r}")
        if self.scorer == "verifier" and self.strategy != "best_of":
            raise ValueError("compute.scorer verifier needs strategy best_of (a vote breaks ties by mean logprob)")
        if self.early_stop and self.strategy != "vote":
            raise ValueError("compute.early_stop needs strategy vote (a best_of score is known only at the end)")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) or not (
                0.5 < self.confidence <= 1):
            raise ValueError(f"compute.confidence must be above 0.5 and at most 1, got {self.confidence!r}")
        if self.confidence < 1 and not self.early_stop:
            raise ValueError("compute.confidence needs early_stop (it says when a vote may stop)")
        make_extractor(self.answer)  # raises for an unknown one

    @classmethod
    def of(cls, value: "ComputeParams | dict") -> "ComputeParams":
        """From itself or a dict with the request field's keys (unknown keys refused by name)."""
        if isinstance(value, ComputeParams):
            return value
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"compute.{unknown[0]} is not a compute option (strategy, samples, answer, scorer, "
                             "early_stop, confidence)")
        return cls(**value)

    def check_limit(self, max_samples: int) -> None:
        if self.samples > max_samples:
            raise ValueError(f"compute.samples must be at most {max_samples} (the server's --max-compute-samples), "
                             f"got {self.samples}")
