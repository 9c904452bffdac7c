"""`ownllm eval`: a task family's problems through a model (offline LLM) or a running server (OpenAI API), greedy
and then each strategy at each sample count -> accuracy with a 95% Wilson interval, completion tokens and seconds
per problem. Never tunes anything.

Two ways to get the curve: real requests per strategy and sample count (`evaluate`: every wall time is real), or
one request of the largest count per problem, every sample's answer, logprob and verifier score kept, and each
strategy at each smaller count replayed on subsets of those samples (`evaluate_curve`, evals/replay.py: the standard
estimate, as in arXiv 2407.21787, at a fraction of the cost; its wall time is the largest request's). Every problem's
result is a JSON line as it finishes; `curve` and `summarize` rebuild the rows from such lines."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

from ownllm.compute.extractors import normalize_number, number
from ownllm.compute.params import ComputeParams
from ownllm.compute.strategies import SampleResult
from ownllm.evals.replay import play, subsets
from ownllm.evals.tasks import Problem

STRATEGIES = {  # name -> the compute field (samples added per run)
    "vote": {"strategy": "vote", "answer": "number"},
    "vote_early_stop": {"strategy": "vote", "answer": "number", "early_stop": True},
    "vote_early_stop_95": {"strategy": "vote", "answer": "number", "early_stop": True, "confidence": 0.95},
    "vote_early_stop_90": {"strategy": "vote", "answer": "number", "early_stop": True, "confidence": 0.9},
    "best_of": {"strategy": "best_of", "answer": "number"},
    "best_of_verifier": {"strategy": "best_of", "answer": "number", "scorer": "verifier"},
}

# (prompt, compute field or None for greedy) -> (the answer, completion tokens, every sample: [] for greedy)
Solver = Callable[[str, dict | None], tuple[str | None, int, list[SampleResult]]]


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
    lines = []
    for problem in problems:
        asked = time.perf_counter()
        answer, tokens, _ = solve(problem.prompt, field)
        lines.append({"strategy": strategy, "samples": samples, "index": problem.index, "answer": answer,
                      "correct": problem.is_correct(answer), "tokens": tokens,
                      "seconds": round(time.perf_counter() - asked, 3)})
        record(lines[-1])
        advance()
    return summarize(lines)


def summarize(lines: list[dict]) -> EvalResult:
    """One real run's per-problem lines (one strategy and sample count) -> its row."""
    n = max(len(lines), 1)
    num_correct = sum(line["correct"] for line in lines)
    low, high = wilson_interval(num_correct, len(lines))
    return EvalResult(lines[0]["strategy"], lines[0]["samples"], len(lines), num_correct, num_correct / n, low, high,
                      sum(line["tokens"] for line in lines) / n, sum(line["seconds"] for line in lines) / n)


def evaluate_curve(solve: Solver, problems: list[Problem], strategies: list[str], counts: list[int],
                   advance: Callable[[], None] = lambda: None,
                   record: Callable[[dict], None] = lambda line: None) -> list[EvalResult]:
    """One request of max(counts) samples per problem (scored by the verifier if a strategy asks for it), every
    sample kept, then every strategy at every count replayed on subsets of them (evals/replay.py). record gets one
    JSON-ready line per problem as it finishes; `curve` turns such lines into rows."""
    largest = max(counts)
    verifier = any(STRATEGIES[s].get("scorer") == "verifier" for s in strategies)
    field = {"strategy": "best_of", "answer": "number", "samples": largest,
             "scorer": "verifier" if verifier else "logprob"}
    lines = []
    for problem in problems:
        asked = time.perf_counter()
        _, tokens, samples = solve(problem.prompt, field)
        lines.append({"strategy": "replayed", "samples": largest, "index": problem.index, "expected": problem.answer,
                      "tokens": tokens, "seconds": round(time.perf_counter() - asked, 3),
                      "per_sample": [s.as_dict() for s in samples]})
        record(lines[-1])
        advance()
    return curve(lines, strategies, counts)


def curve(lines: list[dict], strategies: list[str], counts: list[int]) -> list[EvalResult]:
    """Replayed lines (each problem's samples) -> a row per strategy and count: the mean over problems of the
    expected accuracy and sampled tokens on k-subsets. The interval is Wilson's on the summed per-problem means
    (conservative: averaging over subsets only narrows the spread); seconds only where k is the run's own count."""
    rows = []
    recorded = [[SampleResult(**s) for s in line["per_sample"]] for line in lines]  # parsed once, replayed often
    for strategy in strategies:
        params = ComputeParams(**STRATEGIES[strategy])
        for count in counts:
            accuracy = tokens = 0.0
            for line, samples in zip(lines, recorded):
                plays = [play(params, subset)
                         for subset in subsets(samples, count, line["index"], ordered=params.early_stop)]
                accuracy += sum(_is_right(answer, line["expected"]) for answer, _ in plays) / len(plays)
                tokens += sum(spent for _, spent in plays) / len(plays)
            n = max(len(lines), 1)
            low, high = wilson_interval(accuracy, len(lines))
            largest = lines[0]["samples"] if lines else count
            timed = count == largest and all("seconds" in line for line in lines)
            rows.append(EvalResult(strategy, count, len(lines), round(accuracy, 3), accuracy / n, low, high,
                                   tokens / n, sum(line["seconds"] for line in lines) / n if timed else None,
                                   largest))
    return rows


def rebuild(lines: list[dict], strategies: list[str], counts: list[int]) -> list[EvalResult]:
    """Recorded lines (a finished or interrupted run's .problems.jsonl) -> the rows: each real run summarized, and
    the replayed samples replayed again for these strategies at the counts they hold."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for line in lines:
        runs.setdefault((line["strategy"], line["samples"]), []).append(line)
    rows = [summarize(group) for key, group in runs.items() if key[0] != "replayed"]
    for (strategy, largest), group in runs.items():
        if strategy == "replayed":
            rows += curve(group, strategies, [c for c in counts if c <= largest])
    return rows


def _is_right(answer: str | None, expected: str) -> bool:
    return answer is not None and normalize_number(answer) == expected


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
