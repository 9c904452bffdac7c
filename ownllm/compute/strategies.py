"""How N samples become one answer: a self-consistency vote (ties broken by mean token logprob) or best-of-N by a
score, and adaptive early stopping (stop once the leader cannot be overtaken by the samples still to come).

With early stopping the samples are drawn in waves: only as many run at a time as could, all agreeing with the
leader, decide the vote (N/2 + 1 at first); more start only while it is open. Started all at once, the samples
decode as one batch and are nearly done by the time the vote is decided, which saves almost nothing.

A ComputeSession is fed each sample as it finishes and says how many samples to start and which to stop; at the end
it picks the chosen sample and summarizes the run. It never drives an engine: the offline LLM and the server do, and
act on what it decides.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ownllm.compute.extractors import make_extractor
from ownllm.compute.params import ComputeParams

STOPPED = "abort"  # the finish reason of a sample stopped early


@dataclass
class Sample:
    index: int
    text: str = ""
    num_tokens: int = 0
    cumulative_logprob: float = 0.0  # of the sampled tokens, in the raw model distribution
    finish_reason: str | None = None  # None while running
    answer: str | None = None  # extracted once finished (never from a stopped sample)
    score: float | None = None  # best_of: the scorer's score

    @property
    def mean_logprob(self) -> float:
        return self.cumulative_logprob / self.num_tokens if self.num_tokens else float("-inf")

    @property
    def is_complete(self) -> bool:
        """Finished on its own (not stopped early), so it has a say."""
        return self.finish_reason is not None and self.finish_reason != STOPPED


@dataclass
class ComputeProgress:
    samples_done: int
    samples: int
    leader: str | None
    leader_count: int


@dataclass
class AnswerCount:
    answer: str | None  # None: the samples no answer could be extracted from
    count: int


@dataclass
class SampleResult:
    """One sample as the summary reports it: what an eval needs to replay any strategy on a subset of the samples."""

    index: int
    answer: str | None
    num_tokens: int
    cumulative_logprob: float
    finish_reason: str | None
    score: float | None  # best_of: the scorer's score

    def as_dict(self) -> dict:
        score = self.score if self.score is not None and math.isfinite(self.score) else None
        return {"index": self.index, "answer": self.answer, "num_tokens": self.num_tokens,
                "cumulative_logprob": self.cumulative_logprob, "finish_reason": self.finish_reason, "score": score}

    def as_sample(self, index: int) -> Sample:
        return Sample(index, num_tokens=self.num_tokens, cumulative_logprob=self.cumulative_logprob,
                      finish_reason=self.finish_reason, answer=self.answer, score=self.score)


@dataclass
class ComputeSummary:
    """What a request's compute did: the `compute` object of a response."""

    strategy: str
    answer: str | None  # the chosen sample's answer
    answers: list[AnswerCount]  # most votes first
    samples: int  # asked for
    samples_run: int  # finished on their own
    samples_saved: int  # stopped early because the vote was decided
    agreement: float  # the chosen answer's share of the samples run
    completion_tokens: int  # of every sample, the stopped ones' partial tokens included
    chosen_index: int
    score: float | None = None  # best_of: the chosen sample's score
    per_sample: list[SampleResult] = field(default_factory=list)  # every sample, stopped ones included

    def as_dict(self) -> dict:
        return {
            "strategy": self.strategy, "answer": self.answer,
            "answers": [{"answer": a.answer, "count": a.count} for a in self.answers],
            "samples": self.samples, "samples_run": self.samples_run, "samples_saved": self.samples_saved,
            "agreement": self.agreement, "completion_tokens": self.completion_tokens,
            "chosen_index": self.chosen_index,
            "score": self.score if self.score is not None and math.isfinite(self.score) else None,
            "per_sample": [s.as_dict() for s in self.per_sample],
        }


@dataclass
class ComputeSession:
    params: ComputeParams
    samples: list[Sample] = field(init=False)

    def __post_init__(self) -> None:
        self.extract = make_extractor(self.params.answer)
        self.samples = [Sample(i) for i in range(self.params.samples)]
        self.num_started = self._decisive([0], self.params.samples) if self.params.early_stop else self.params.samples

    @property
    def running(self) -> list[Sample]:
        """Not finished: running in the engine or not started yet (either may still vote)."""
        return [s for s in self.samples if s.finish_reason is None]

    @property
    def complete(self) -> list[Sample]:
        return [s for s in self.samples if s.is_complete]

    def samples_to_start(self) -> int:
        """How many more samples to start now (they are the next by index): enough in flight that, if they all
        agree with the leader, the vote is decided. Asked after each batch of finished samples; 0 once decided."""
        if self.is_decided():
            return 0
        counts, to_come = self._counts(), len(self.running)
        in_flight = sum(1 for s in self.samples[:self.num_started] if s.finish_reason is None)
        more = max(0, min(self._decisive(counts, to_come) - in_flight, self.params.samples - self.num_started))
        self.num_started += more
        return more

    def _counts(self) -> list[int]:
        """Each answer's votes, most first, then the finished samples without an answer (they vote for nobody)."""
        votes = sorted(self.votes().values(), reverse=True)
        return votes + [len(self.complete) - sum(votes)]

    def _decisive(self, counts: list[int], to_come: int) -> int:
        """The fewest of the samples to come that, all voting for the leader, decide the vote (all of them if none
        do: the last one always does)."""
        counts = counts if len(counts) > 1 else [0, 0]  # no votes yet: the first answer will lead
        return next((x for x in range(1, to_come) if self._decides([counts[0] + x, *counts[1:]], to_come - x)),
                    to_come)

    def _decides(self, counts: list[int], to_come: int) -> bool:
        leader, runner_up = counts[0] if len(counts) > 1 else 0, counts[1] if len(counts) > 2 else 0
        if leader > runner_up + to_come:  # cannot be overtaken (a tie would be broken by logprob: it could lose)
            return True
        confidence = self.params.confidence
        return confidence < 1 and leader > 0 and leader_win_probability(counts[:-1], counts[-1], to_come) >= (
            confidence)

    def update(self, index: int, num_tokens: int, cumulative_logprob: float) -> None:
        """Records how far a running sample got (what a stopped sample spent stays counted)."""
        sample = self.samples[index]
        sample.num_tokens, sample.cumulative_logprob = num_tokens, cumulative_logprob

    def finish(self, index: int, text: str, num_tokens: int, cumulative_logprob: float, finish_reason: str) -> None:
        """Records a finished sample (a stopped one's final output only brings its tokens)."""
        self.update(index, num_tokens, cumulative_logprob)
        sample = self.samples[index]
        if sample.finish_reason is None:
            sample.text, sample.finish_reason = text, finish_reason
            sample.answer = self.extract(text) if sample.is_complete else None

    def samples_to_stop(self) -> list[int]:
        """With early_stop, once the vote is decided: the running samples, now marked stopped (the driver stops them
        in the engine). Asked after each batch of finished samples, so samples finishing together all count."""
        if not (self.params.early_stop and self.is_decided()):
            return []
        to_stop = [s.index for s in self.running]
        for i in to_stop:
            self.samples[i].finish_reason = STOPPED
        return to_stop

    def votes(self) -> Counter[str]:
        return Counter(s.answer for s in self.complete if s.answer is not None)

    def is_decided(self) -> bool:
        """True once the leader stays the leader whatever the samples to come answer: it has more votes than the
        runner-up could reach; or, with a confidence below 1, once it wins the whole vote with that probability."""
        return self._decides(self._counts(), len(self.running))

    def progress(self) -> ComputeProgress:
        leader = self._vote_winner()
        return ComputeProgress(len(self.complete), self.params.samples, leader, self.votes().get(leader, 0))

    def _vote_winner(self) -> str | None:
        """Most votes; among tied answers, the one whose best sample has the highest mean token logprob."""
        votes = self.votes()
        if not votes:
            return None
        best = {a: max(s.mean_logprob for s in self.complete if s.answer == a) for a in votes}
        return max(votes, key=lambda a: (votes[a], best[a]))

    def result(self) -> ComputeSummary:
        """The chosen sample and the summary; best_of with the verifier needs every complete sample's score set."""
        complete = self.complete or self.samples  # nothing complete: only a client's abort can leave that
        if self.params.strategy == "vote":
            winner = self._vote_winner()
            pool = [s for s in complete if s.answer == winner] or complete
            chosen = max(pool, key=lambda s: (s.mean_logprob, -s.index))
        else:
            for s in complete:
                if self.params.scorer == "logprob":
                    s.score = s.mean_logprob
            chosen = max(complete, key=lambda s: (s.score if s.score is not None else float("-inf"), -s.index))
        counts = Counter(s.answer for s in self.complete)
        answers = sorted((AnswerCount(a, c) for a, c in counts.items()),
                         key=lambda a: (-a.count, a.answer is None, a.answer or ""))
        num_run = len(self.complete)
        return ComputeSummary(
            strategy=self.params.strategy, answer=chosen.answer, answers=answers, samples=self.params.samples,
            samples_run=num_run, samples_saved=self.params.samples - num_run,
            agreement=round(counts[chosen.answer] / num_run, 4) if num_run and chosen.answer is not None else 0.0,
            completion_tokens=sum(s.num_tokens for s in self.samples), chosen_index=chosen.index,
            score=chosen.score,
            per_sample=[SampleResult(s.index, s.answer, s.num_tokens, s.cumulative_logprob, s.finish_reason, s.score)
                        for s in self.samples])


def leader_win_probability(votes: list[int], unvoted: int, to_come: int, new_answer_weight: float = 1.0) -> float:
    """A lower bound on the probability that the leader (votes[0]; votes most first) still has the most votes once
    to_come more samples have answered, predicted from the answers so far: each next sample repeats an answer in
    proportion to its count, votes for nobody in proportion to the unvoted samples, or gives a new answer in
    proportion to new_answer_weight (the Dirichlet-process predictive, a Polya urn). For each rival (every other
    answer, and all new answers pooled as one, which only overstates them) the chance that it ends level or ahead
    is exact under that urn (the Dirichlet-multinomial over leader / rival / the rest); their sum bounds the
    leader's chance of losing."""
    leader = votes[0]
    rivals = [*votes[1:], 0]  # the last: any new answer
    total = sum(votes) + unvoted + new_answer_weight
    lose = 0.0
    for i, rival in enumerate(rivals):
        if rival + to_come < leader:  # cannot reach it
            continue
        weight = new_answer_weight if i == len(rivals) - 1 else rival
        rest = total - leader - weight
        lose += _reach_probability(leader, weight, rest, rival, to_come)
    return max(0.0, 1.0 - lose)


def _reach_probability(leader: float, weight: float, rest: float, rival: int, draws: int) -> float:
    """P(rival + y >= leader + x) over draws from an urn of (leader, weight, rest) balls (x to the leader, y to the
    rival): the Dirichlet-multinomial pmf, in logs."""
    total = leader + weight + rest
    base = math.lgamma(total) - math.lgamma(total + draws) + math.lgamma(draws + 1)
    log_rest0 = math.lgamma(rest) if rest > 0 else 0.0
    p = 0.0
    for x in range(draws + 1):
        for y in range(max(0, leader + x - rival), draws - x + 1):
            z = draws - x - y
            if rest <= 0 and z > 0:
                continue
            p += math.exp(base + math.lgamma(leader + x) - math.lgamma(leader) + math.lgamma(weight + y)
                          - math.lgamma(weight) + (math.lgamma(rest + z) - log_rest0 if rest > 0 else 0.0)
                          - math.lgamma(x + 1) - math.lgamma(y + 1) - math.lgamma(z + 1))
    return min(p, 1.0)
