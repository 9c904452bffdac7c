"""The task generator (fixed seeds, disjoint splits, exact answers that the checkers accept), the eval loop's
accuracy and Wilson interval on a scripted solver, the plot, and LLM.generate(compute=...) on a tiny model."""

from __future__ import annotations

import json
import re

import pytest

from ownllm.compute.params import ComputeParams
from ownllm.compute.strategies import SampleResult
from ownllm.evals.replay import MAX_SUBSETS, play, subsets
from ownllm.evals.run import evaluate, evaluate_curve, rebuild, wilson_interval
from ownllm.evals.tasks import FAMILIES, HELDOUT_SIZE, problems


@pytest.mark.parametrize("family", list(FAMILIES))
def test_problems_are_fixed_distinct_per_split_and_checked_exactly(family):
    heldout = problems(family)
    assert len(heldout) == HELDOUT_SIZE and heldout[:5] == problems(family, count=5)
    dev = problems(family, "dev", 50)
    assert not {p.question for p in dev} & {p.question for p in heldout}
    assert len({p.question for p in heldout}) > 0.9 * HELDOUT_SIZE
    for p in heldout[:50]:
        assert p.is_correct(p.answer) and p.is_correct(f"{p.answer}.0") and not p.is_correct(None)


def test_answers_are_right():
    algebra = problems("algebra", count=20)
    for p in algebra:
        a, sign, b, c = re.match(r"Find x if (\d+)x ([+-]) (\d+) = (-?\d+)\.", p.question).groups()
        x = int(p.answer)
        assert int(a) * x + (int(b) if sign == "+" else -int(b)) == int(c)
    jacket = next(p for p in problems("percent", count=40) if "jacket" in p.question)
    price, rate = map(int, re.match(r"A jacket costs \$(\d+)\. It is sold at (\d+)% off", jacket.question).groups())
    assert float(jacket.answer) == price * (100 - rate) / 100


def test_unknown_family_and_split_are_refused():
    with pytest.raises(ValueError, match="^family must be one of chain, percent, units, algebra, got 'geometry'$"):
        problems("geometry")
    with pytest.raises(ValueError, match="^split must be dev or heldout, got 'test'$"):
        problems("chain", "test")


def test_evaluate_counts_correct_answers_and_reports_an_interval():
    chosen = problems("units", count=10)
    answers = {p.prompt: (p.answer if i % 2 else "0") for i, p in enumerate(chosen)}
    asked = []

    def solve(prompt, field):
        asked.append(field)
        return answers[prompt], 7, []

    lines = []
    result = evaluate(solve, chosen, "vote", 4, record=lines.append)
    assert [line["correct"] for line in lines] == [i % 2 == 1 for i in range(10)]
    assert (result.num_correct, result.accuracy, result.tokens_per_problem) == (5, 0.5, 7)
    assert asked[0] == {"strategy": "vote", "answer": "number", "samples": 4}
    assert (result.ci_low, result.ci_high) == wilson_interval(5, 10)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_evaluate_curve_replays_each_strategy_on_subsets_of_one_run():
    """One problem, 5 samples: answers 5,5 (better logprobs) and 7,7,7 (the best verifier score on a 7)."""
    [problem] = problems("units", count=1)
    right, wrong = problem.answer, str(int(float(problem.answer)) + 1)
    samples = [SampleResult(i, a, 10, lp, "stop", score) for i, (a, lp, score) in enumerate(
        [(right, -1.0, 0.2), (right, -2.0, 0.3), (wrong, -5.0, 0.9), (wrong, -6.0, 0.1), (wrong, -7.0, 0.1)])]
    asked, lines = [], []

    def solve(prompt, field):
        asked.append(field)
        return None, 50, samples

    results = evaluate_curve(solve, [problem], ["vote", "best_of", "best_of_verifier"], [1, 2, 5],
                             record=lines.append)
    assert asked == [{"strategy": "best_of", "answer": "number", "samples": 5, "scorer": "verifier"}]
    accuracy = {(r.strategy, r.samples): r.accuracy for r in results}
    # vote: one sample is right 2 times in 5; of the 10 pairs, {5,5} and the 6 mixed ones (a tie the 5s win on
    # logprob) are right; all five: 7 wins 3 to 2
    assert accuracy["vote", 1] == pytest.approx(0.4) and accuracy["vote", 2] == pytest.approx(0.7)
    assert accuracy["vote", 5] == 0
    assert accuracy["best_of", 5] == 1 and accuracy["best_of_verifier", 5] == 0
    # a pair holding sample 2 (score 0.9) picks 7; the other 6 pairs pick the higher score among the rest
    assert accuracy["best_of_verifier", 2] == pytest.approx(
        sum(samples[max(p, key=lambda i: samples[i].score)].answer == right
            for p in [(a, b) for a in range(5) for b in range(a + 1, 5)]) / 10)
    by_count = {r.samples: r for r in results if r.strategy == "vote"}
    assert by_count[5].seconds_per_problem is not None and by_count[2].seconds_per_problem is None
    assert by_count[2].replayed_from == 5 and by_count[2].tokens_per_problem == 20
    assert len(lines[0]["per_sample"]) == 5 and lines[0]["expected"] == problem.answer
    assert rebuild(lines, ["vote"], [1, 2, 5, 8]) == [r for r in results if r.strategy == "vote"]  # 8 > 5: left out


def test_replayed_early_stop_runs_the_waves_step_by_step():
    """8 samples of 10 tokens: the first wave is 5 (strict) or 4 (confidence 0.95), and when they all agree the rest
    never start; a split vote starts more, one wave at a time."""
    agree = [SampleResult(i, "3", 10, -1.0, "stop", None) for i in range(8)]
    strict = ComputeParams("vote", 8, "number", early_stop=True)
    confident = ComputeParams("vote", 8, "number", early_stop=True, confidence=0.95)
    assert play(strict, agree) == ("3", 50) and play(confident, agree) == ("3", 40)
    assert play(ComputeParams("vote", 8, "number"), agree) == ("3", 80)
    # 3 3 4 4 | 3 3 3 3: after the first wave (5 of them: 3 3 4 4 3) it is 3 to 2 with 3 to come, so 2 more start
    # (3 + 2 > 2 + 1); they agree and the eighth never starts
    split = [SampleResult(i, a, 10, -1.0, "stop", None) for i, a in enumerate("33443333")]
    assert play(strict, split) == ("3", 70)
    orders = subsets(split, 8, seed=0, ordered=True)  # the waves depend on the order: the whole set, reshuffled
    assert len(orders) == MAX_SUBSETS and all(sorted(o, key=lambda s: s.index) == split for o in orders)
    assert len({tuple(s.index for s in o) for o in orders}) > 200 and subsets(split, 8, seed=0) == [split]


def test_rebuild_summarizes_real_runs_from_their_lines():
    lines = [{"strategy": "greedy", "samples": 1, "index": i, "answer": "1", "correct": i < 3, "tokens": 10,
              "seconds": 2.0} for i in range(4)]
    [row] = rebuild(lines, ["vote"], [1])
    assert (row.strategy, row.num_correct, row.accuracy, row.tokens_per_problem, row.seconds_per_problem) == (
        "greedy", 3, 0.75, 10, 2.0)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from ownllm.evals.plot import plot

    rows = [{"strategy": s, "samples": n, "accuracy": a, "ci_low": a - 0.1, "ci_high": a + 0.1,
             "tokens_per_problem": 100 * n}
            for s, n, a in [("greedy", 1, 0.3), ("vote", 1, 0.25), ("vote", 4, 0.4)]]
    plot({"model": "m", "family": "chain", "split": "heldout", "num_problems": 10, "results": rows},
         tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from ownllm import LLM
    from tests.checkpoints import build_checkpoint

    folder = tmp_path_factory.mktemp("tiny")
    build_checkpoint(folder, "LlamaForCausalLM", max_position_embeddings=128)
    return LLM(str(folder), dtype="float32", num_kv_blocks=64)


def test_llm_generate_with_compute_returns_the_chosen_sample(tiny_llm):
    from ownllm import SamplingParams

    params = SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True)
    [out] = tiny_llm.generate("Numbers 0123", params, compute={"samples": 5, "answer": "text"})
    samples = tiny_llm.generate("Numbers 0123", SamplingParams(**{**params.__dict__, "n": 5}))[0].outputs
    summary = out.compute
    assert summary.samples_run == 5 and len(out.outputs) == 1
    assert out.outputs[0].text == samples[summary.chosen_index].text  # seeded: the same five samples
    assert json.dumps(summary.as_dict())  # plain JSON
    assert tiny_llm.kv_cache.num_free_blocks == tiny_llm.kv_cache.num_blocks
    with pytest.raises(ValueError, match=r"^compute cannot be combined with n > 1"):
        tiny_llm.generate("x", SamplingParams(n=2), compute={"samples": 2})
