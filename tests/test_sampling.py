"""Sampling: parameter validation, seeded reproducibility, and draws that follow the model's distribution."""

from __future__ import annotations

import pytest
import torch

from ownllm import SamplingParams
from ownllm.request import Request
from ownllm.worker.sampler import Sampler, apply_penalties, filter_logits

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"), (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(presence_penalty=3), "presence_penalty"),
])
def test_invalid_values_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def _draws(params: SamplingParams, num: int, request_id: str = "r") -> torch.Tensor:
    sampler = Sampler()
    request = Request(request_id, [0], params)
    counts = torch.zeros(len(LOGITS))
    for _ in range(num):
        counts[sampler(LOGITS[None].clone(), [request])[0].token_id] += 1
    return counts


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token the filters exclude"
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


# chi-square critical values at p = 0.001 by degrees of freedom
CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(temperature=1.0, seed=7), LOGITS.softmax(-1)),
    (SamplingParams(temperature=0.7, seed=8), (LOGITS / 0.7).softmax(-1)),
    (SamplingParams(temperature=1.0, top_k=3, seed=9),
     torch.cat([LOGITS[:3].softmax(-1), torch.zeros(5)])),
    (SamplingParams(temperature=1.0, top_p=0.7, seed=10),  # mass before each token 0, 0.40, 0.65, 0.80: keeps three
     torch.cat([LOGITS[:3].softmax(-1), torch.zeros(5)])),
    (SamplingParams(temperature=1.0, min_p=0.2, seed=11),  # p >= 0.2 * p_max keeps e^-x >= 0.2: x <= 1.6
     torch.cat([LOGITS[:4].softmax(-1), torch.zeros(4)])),
])
def test_sampled_frequencies_match_the_distribution(params, expected):
    counts = _draws(params, 6000)
    statistic, dof = _chi_square(counts, expected)
    assert statistic < CRITICAL[dof], f"chi-square {statistic:.1f} with {dof} dof; counts {counts.tolist()}"


def test_chi_square_detects_a_wrong_distribution():
    """The statistical test has power: draws at temperature 1 are rejected against temperature 0.7's distribution."""
    counts = _draws(SamplingParams(temperature=1.0, seed=7), 6000)
    statistic, dof = _chi_square(counts, (LOGITS / 0.7).softmax(-1))
    assert statistic > CRITICAL[dof]


def test_seed_reproduces_and_different_seeds_differ():
    a = _draws(SamplingParams(temperature=1.0, seed=123), 200)
    b = _draws(SamplingParams(temperature=1.0, seed=123), 200)
    c = _draws(SamplingParams(temperature=1.0, seed=124), 200)
    assert torch.equal(a, b)
    sampler_a, sampler_c = Sampler(), Sampler()
    ra, rc = Request("a", [0], SamplingParams(temperature=1.0, seed=123)), Request("c", [0], SamplingParams(temperature=1.0, seed=124))
    seq_a = [sampler_a(LOGITS[None].clone(), [ra])[0].token_id for _ in range(50)]
    seq_c = [sampler_c(LOGITS[None].clone(), [rc])[0].token_id for _ in range(50)]
    assert seq_a != seq_c
    assert not torch.equal(a, c) or seq_a != seq_c


def test_greedy_picks_argmax_and_reports_raw_logprobs():
    request = Request("g", [0], SamplingParams(temperature=0, logprobs=3))
    result = Sampler()(LOGITS[None].clone(), [request])[0]
    raw = LOGITS.log_softmax(-1)
    assert result.token_id == 0 and result.rank == 1
    assert result.logprob == pytest.approx(float(raw[0]))
    assert [t for t, _ in result.top_logprobs] == [0, 1, 2]


def test_min_tokens_masks_stop_ids():
    request = Request("m", [0], SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1]))
    assert Sampler(eos_token_ids=[0])(LOGITS[None].clone(), [request])[0].token_id == 2
    request.output_token_ids = [5, 5]
    assert Sampler(eos_token_ids=[0])(LOGITS[None].clone(), [request])[0].token_id == 0


def test_penalties():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    request = Request("p", [0], params)  # prompt token 0
    request.output_token_ids = [1, 1, 6]
    out = apply_penalties(LOGITS.clone(), request)
    assert out[0] == pytest.approx(2.0 / 2)  # repetition only (prompt)
    assert out[1] == pytest.approx(1.5 / 2 - 0.5 - 2 * 0.25)  # repetition + presence + 2x frequency
    assert out[6] == pytest.approx(-1.0 * 2 - 0.5 - 0.25)  # negative logits are multiplied
    assert out[2] == LOGITS[2]


def test_filters_keep_at_least_one_token():
    kept = filter_logits(LOGITS.clone(), top_k=0, top_p=1e-6, min_p=0.0)
    assert torch.isfinite(kept).sum() == 1 and torch.isfinite(kept[0])
