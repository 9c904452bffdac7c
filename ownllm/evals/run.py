"""`ownllm eval`: a task family's problems through a model (offline LLM) or a running server (OpenAI API), greedy
and then each strategy at each sample count -> accuracy with a 95% Wilson interval, completion tokens and seconds
per problem. Never tunes anything.

Two ways to get the curve: real requests per strategy and sample count (`evaluate`: every wall time is real), or
one request of the largest count per problem, every sample's answer, logprob and verifier score kept, and each
strategy at each smaller count replayed on subsets of those samples (`evaluate_curve`: the standard estimate, as in
arXiv 2407.21787, at a fraction of the cost; its wall time is the largest request's)."""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

from ownllm.compute.extractors import number
from ownllm.compute.params import ComputeParams
from ownllm.compute.strategies import SampleResult, replay
from ownllm.evals.tasks import Problem

STRATEGIES = {  # name -> the compute field (samples added per run)
    "vote": {"strategy": "vote", "answer": "number"},
    "vote_early_stop": {"strategy": "vote", "answer": "number", "early_stop": True},
    "best_of": {"strategy": "best_of", "answer": "number"},
    "best_of_verifier": {"strategy": "best_of", "answer": "number", "scorer": "verifier"},
}

# (prompt, compute field or None for greedy) -> (the answer, completion tokens, every sample: [] for greedy)
Solver = Callable[[str, dict | None], tuple[str | None, int, list[SampleResult]]]
MAX_SUBSETS = 256  # subsets of a sample count replayed per problem (all of them when there are fewer)


@dataclass
class EvalResult:
    strategy: str  # "greedy" or a STRATEGIES name
    samples: int
    num_problems: int
    num_correct: float  # replayed rows: the sum of per-problem expected accuracies
    accuracy: float
    ci_low: float
    ci_high: float
    tokens_per_problem: float
    seconds_per_problem: float | None  # None: replayed from a larger run, which had its own wall time
    replayed_from: int | None = None  # the sample count of the run this row was replayed from


def wilson_interval(num_correct: float, num: int, z: float = 1.96) -> tuple[float, float]:
    if num == 0:
        return 0.0, 0.0
    p = num_correct / num
    center = (p + z * z / (2 * num)) / (1 + z * z / num)
    half = z * math.sqrt(p * (1 - p) / num + z * z / (4 * num * num)) / (1 + z * z / num)
    return max(0.0, center - half), min(1.0, center + half)


def evaluate(solve: Solver, problems: list[Problem], strategy: str, samples: int,
             advance: Callable[[], None] = lambda: None,
             record: Callable[[dict], None] = lambda line: None) -> EvalResult:
    """Real requests, one per problem; record gets one JSON-ready line per problem as it finishes."""
    field = None if strategy == "greedy" else {**STRATEGIES[strategy], "samples": samples}
    num_correct = num_tokens = 0
    started = time.perf_counter()
    for problem in problems:
        asked = time.perf_counter()
        answer, tokens, _ = solve(problem.prompt, field)
        num_correct += problem.is_correct(answer)
        num_tokens += tokens
        record({"strategy": strategy, "samples": samples, "index": problem.index, "answer": answer,
                "correct": problem.is_correct(answer), "tokens": tokens,
                "seconds": round(time.perf_counter() - asked, 3)})
        advance()
    seconds = time.perf_counter() - started
    low, high = wilson_interval(num_correct, len(problems))
    n = max(len(problems), 1)
    return EvalResult(strategy, samples, len(problems), num_correct, num_correct / n, low, high, num_tokens / n,
                      seconds / n)


def evaluate_curve(solve: Solver, problems: list[Problem], strategies: list[str], counts: list[int],
                   advance: Callable[[], None] = lambda: None,
                   record: Callable[[dict], None] = lambda line: None) -> list[EvalResult]:
    """One request of max(counts) samples per problem (scored by the verifier if a strategy asks for it), then every
    strategy at every count replayed on subsets of its samples: a problem's accuracy at k samples is the mean over
    up to MAX_SUBSETS k-subsets (fixed seed). The interval is Wilson's on the summed per-problem means (conservative:
    averaging over subsets only narrows the spread). record gets one JSON-ready line per problem as it finishes."""
    largest = max(counts)
    verifier = any(STRATEGIES[s].get("scorer") == "verifier" for s in strategies)
    field = {"strategy": "best_of", "answer": "number", "samples": largest,
             "scorer": "verifier" if verifier else "logprob"}
    expected = {(s, k): 0.0 for s in strategies for k in counts}
    num_tokens = 0
    started = time.perf_counter()
    for problem in problems:
        _, tokens, samples = solve(problem.prompt, field)
        num_tokens += tokens
        scores = {}
        for strategy in strategies:
            params = ComputeParams(**{k: v for k, v in STRATEGIES[strategy].items() if k != "early_stop"})
            for count in counts:
                picks = [replay(params, subset) for subset in _subsets(samples, count, seed=problem.index)]
                scores[f"{strategy}@{count}"] = sum(map(problem.is_correct, picks)) / len(picks)
                expected[strategy, count] += scores[f"{strategy}@{count}"]
        record({"strategy": "replayed", "samples": largest, "index": problem.index, "expected": problem.answer,
                "tokens": tokens, "accuracy": scores, "per_sample": [s.as_dict() for s in samples]})
        advance()
    n = max(len(problems), 1)
    seconds = (time.perf_counter() - started) / n
    results = []
    for (strategy, count), total in expected.items():
        low, high = wilson_interval(total, len(problems))
        results.append(EvalResult(strategy, count, len(problems), round(total, 3), total / n, low, high,
                                  num_tokens * count / largest / n, seconds if count == largest else None, largest))
    return results


def _subsets(samples: list[SampleResult], count: int, seed: int) -> list[list[SampleResult]]:
    if count >= len(samples):
        return [samples]
    if math.comb(len(samples), count) <= MAX_SUBSETS:
        return [list(c) for c in itertools.combinations(samples, count)]
    rng = random.Random(seed)
    return [rng.sample(samples, count) for _ in range(MAX_SUBSETS)]


def offline_solver(llm, max_tokens: int, temperature: float) -> Solver:
    from ownllm.sampling_params import SamplingParams

    def solve(prompt: str, field: dict | None) -> tuple[str | None, int, list[SampleResult]]:
        messages = [{"role": "user", "content": prompt}]
        if field is None:
            output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens))[0]
            return number(output.outputs[0].text), len(output.outputs[0].token_ids), []
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        summary = llm.chat(messages, params, compute=field)[0].compute
        return summary.answer, summary.completion_tokens, summary.per_sample

    return solve


def server_solver(base_url: str, model: str | None, max_tokens: int, temperature: float) -> Solver:
    import openai

    client = openai.OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key="unused", max_retries=0, timeout=3600)
    model = model or client.models.list().data[0].id

    def solve(prompt: str, field: dict | None) -> tuple[str | None, int, list[SampleResult]]:
        messages = [{"role": "user", "content": prompt}]
        if field is None:
            answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=0)
            return number(answer.choices[0].message.content or ""), answer.usage.completion_tokens, []
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=temperature, extra_body={"compute": field})
        compute = answer.model_extra["compute"]
        samples = [SampleResult(**s) for s in compute.get("per_sample", [])]
        return compute["answer"], answer.usage.completion_tokens, samples

    return solve


def as_json(results: list[EvalResult], meta: dict) -> dict:
    return {**meta, "results": [asdict(r) for r in results]}
