"""`ownllm eval`: a task family's problems through a model (offline LLM) or a running server (OpenAI API), greedy
and then each strategy at each sample count, as real requests (so wall times are real) -> accuracy with a 95%
Wilson interval, completion tokens and seconds per problem. Writes JSON; never tunes anything."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

from ownllm.compute.extractors import number
from ownllm.evals.tasks import Problem

STRATEGIES = {  # name -> the compute field (samples added per run)
    "vote": {"strategy": "vote", "answer": "number"},
    "vote_early_stop": {"strategy": "vote", "answer": "number", "early_stop": True},
    "best_of": {"strategy": "best_of", "answer": "number"},
    "best_of_verifier": {"strategy": "best_of", "answer": "number", "scorer": "verifier"},
}

# (prompt, compute field or None for greedy) -> (the answer, completion tokens)
Solver = Callable[[str, dict | None], tuple[str | None, int]]


@dataclass
class EvalResult:
    strategy: str  # "greedy" or a STRATEGIES name
    samples: int
    num_problems: int
    num_correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    tokens_per_problem: float
    seconds_per_problem: float


def wilson_interval(num_correct: int, num: int, z: float = 1.96) -> tuple[float, float]:
    if num == 0:
        return 0.0, 0.0
    p = num_correct / num
    center = (p + z * z / (2 * num)) / (1 + z * z / num)
    half = z * math.sqrt(p * (1 - p) / num + z * z / (4 * num * num)) / (1 + z * z / num)
    return max(0.0, center - half), min(1.0, center + half)


def evaluate(solve: Solver, problems: list[Problem], strategy: str, samples: int,
             advance: Callable[[], None] = lambda: None) -> EvalResult:
    field = None if strategy == "greedy" else {**STRATEGIES[strategy], "samples": samples}
    num_correct = num_tokens = 0
    started = time.perf_counter()
    for problem in problems:
        answer, tokens = solve(problem.prompt, field)
        num_correct += problem.is_correct(answer)
        num_tokens += tokens
        advance()
    seconds = time.perf_counter() - started
    low, high = wilson_interval(num_correct, len(problems))
    n = max(len(problems), 1)
    return EvalResult(strategy, samples, len(problems), num_correct, num_correct / n, low, high, num_tokens / n,
                      seconds / n)


def offline_solver(llm, max_tokens: int, temperature: float) -> Solver:
    from ownllm.sampling_params import SamplingParams

    def solve(prompt: str, field: dict | None) -> tuple[str | None, int]:
        messages = [{"role": "user", "content": prompt}]
        if field is None:
            output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens))[0]
            return number(output.outputs[0].text), len(output.outputs[0].token_ids)
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        output = llm.chat(messages, params, compute=field)[0]
        return output.compute.answer, output.compute.completion_tokens

    return solve


def server_solver(base_url: str, model: str | None, max_tokens: int, temperature: float) -> Solver:
    import openai

    client = openai.OpenAI(base_url=f"{base_url.rstrip('/')}/v1", api_key="unused", max_retries=0, timeout=3600)
    model = model or client.models.list().data[0].id

    def solve(prompt: str, field: dict | None) -> tuple[str | None, int]:
        messages = [{"role": "user", "content": prompt}]
        if field is None:
            answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    temperature=0)
            return number(answer.choices[0].message.content or ""), answer.usage.completion_tokens
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=temperature, extra_body={"compute": field})
        return answer.model_extra["compute"]["answer"], answer.usage.completion_tokens

    return solve


def as_json(results: list[EvalResult], meta: dict) -> dict:
    return {**meta, "results": [asdict(r) for r in results]}
