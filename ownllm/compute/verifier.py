"""The verifier scorer: a model asked whether a sample's answer is correct, scored by its probability of "yes".

This module writes the verifier's prompt and reads its answer's first-token logprobs; the drivers (offline LLM,
server) run it on the served model."""

from __future__ import annotations

import math
from typing import Iterable

from ownllm.sampling_params import SamplingParams

VERIFIER_QUESTION = "Is the answer above correct? Answer yes or no."
NUM_VERIFIER_LOGPROBS = 20


def verifier_params() -> SamplingParams:
    """One greedy token with the top alternatives' logprobs: enough to read p(yes) and p(no)."""
    return SamplingParams(temperature=0, max_tokens=1, logprobs=NUM_VERIFIER_LOGPROBS, output_kind="final_only")


def verifier_messages(messages: list[dict], answer: str) -> list[dict]:
    """A chat: the conversation, the sample as the assistant's answer, then the question."""
    return [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": VERIFIER_QUESTION}]


def verifier_text(prompt: str, answer: str) -> str:
    """A plain completion prompt: the prompt, the sample, then the question."""
    return f"{prompt}{answer}\n\n{VERIFIER_QUESTION}\nAnswer:"


def yes_probability(first_token_logprobs: Iterable[tuple[str, float]]) -> float:
    """(token text, logprob) of the verifier's first-token alternatives -> p(yes) / (p(yes) + p(no)), counting
    every spelling ("Yes", " yes"...); 0 when neither is among them."""
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in first_token_logprobs:
        word = token.strip().lower()
        if word in mass:
            mass[word] += math.exp(logprob)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else 0.0
