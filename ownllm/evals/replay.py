"""Strategies replayed on recorded samples: what a run of k of them would have answered and spent, for every
strategy at every k, from one run of N >= k samples per problem (the estimate of arXiv 2407.21787: a problem's
accuracy at k is the mean over up to MAX_SUBSETS k-subsets, fixed seed).

The choice is the live session's own (ComputeSession.result, ties and all). An early-stopping vote is replayed one
decode step at a time, as the engine runs it: each started sample gains a token a step and finishes after its
recorded length, the session starts waves and stops samples between steps, and a stopped sample keeps the tokens it
had spent (the prompt's prefill aside)."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

from ownllm.compute.params import ComputeParams
from ownllm.compute.strategies import STOPPED, ComputeSession, SampleResult

MAX_SUBSETS = 256  # subsets of a sample count replayed per problem (all of them when there are fewer)


def play(params: ComputeParams, samples: list[SampleResult]) -> tuple[str | None, int]:
    """The answer a run of just these samples (in this order) would choose under params, and its sampled tokens."""
    session = ComputeSession(replace(params, samples=len(samples)))
    if not params.early_stop:
        session.samples = [r.as_sample(i) for i, r in enumerate(samples)]
        return session.result().answer, sum(r.num_tokens for r in samples)
    spent = [0] * len(samples)
    while running := [i for i in range(session.num_started) if session.samples[i].finish_reason is None]:
        step = min(max(samples[i].num_tokens - spent[i], 1) for i in running)  # to the next sample's end
        for i in running:
            spent[i] += step
            if spent[i] >= samples[i].num_tokens:
                session.samples[i] = samples[i].as_sample(i)
        if not session.samples_to_stop():
            session.samples_to_start()
    for i, sample in enumerate(session.samples):
        if sample.finish_reason == STOPPED:
            sample.num_tokens = spent[i]
    return session.result().answer, sum(spent)


def subsets(samples: list[SampleResult], count: int, seed: int, ordered: bool = False) -> list[list[SampleResult]]:
    """The k-subsets a count is replayed on: all of them when there are at most MAX_SUBSETS, else MAX_SUBSETS drawn
    at random. ordered (an early-stopping vote, whose waves depend on the order): each in a random order, and the
    whole set in MAX_SUBSETS orders."""
    rng = random.Random(seed)
    if count >= len(samples) and not ordered:
        return [samples]
    if math.comb(len(samples), count) <= MAX_SUBSETS and count < len(samples):
        chosen = [list(c) for c in itertools.combinations(samples, count)]
        return [rng.sample(c, len(c)) for c in chosen] if ordered else chosen
    return [rng.sample(samples, min(count, len(samples))) for _ in range(MAX_SUBSETS)]
