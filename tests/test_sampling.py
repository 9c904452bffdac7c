"""Sampling: parameter validation, seeded reproducibility, and draws that follow the model's distribution."""

from __future__ import annotations

import pytest
import torch

from ownllm import SamplingParams
from ownllm.worker.sampler import (CDF_BLOCK, Sampler, SamplerOutput, SamplingMetadata, SamplingRow, _first_above,
                                  _inverse_cdf, apply_token_bitmask, filter_logits)

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def row(params: SamplingParams, prompt=(0,), output=(), generator=None) -> SamplingRow:
    if generator is None and params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, list(prompt) + list(output), len(prompt), generator=generator)


def sample(rows: list[SamplingRow], logits: torch.Tensor | None = None, eos=(), bitmask=None) -> SamplerOutput:
    logits = LOGITS.expand(len(rows), -1).clone() if logits is None else logits
    meta = SamplingMetadata.build(rows, logits.shape[-1], set(eos), allowed_token_bitmask=bitmask)
    return Sampler()(logits, meta)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"), (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(presence_penalty=3), "presence_penalty"),
])
def test_invalid_values_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def _draws(params: SamplingParams, num: int) -> torch.Tensor:
    """num draws of one seeded request, in batches of 100 rows sharing its generator."""
    one = row(params)
    counts = torch.zeros(len(LOGITS))
    for _ in range(num // 100):
        for token_id in sample([one] * 100).token_ids:
            counts[token_id] += 1
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


def test_inverse_cdf_draws_across_blocks_follow_the_weights():
    """A vocabulary of several CDF blocks and a ragged last one: tokens of zero weight (beside every boundary, and
    the padding) are never drawn, the frequencies match the weights, and each draw is the token a float64 running
    sum over the whole row gives for the same uniform number, small weights (1e-4 each) included."""
    vocab = 3 * CDF_BLOCK + 37
    weights = torch.zeros(vocab)
    picked = [0, CDF_BLOCK - 1, CDF_BLOCK + 5, 2 * CDF_BLOCK, 3 * CDF_BLOCK + 2, vocab - 1]
    weights[picked] = torch.tensor([3.0, 1.0, 2.0, 0.5, 1.0, 1.5])
    weights[CDF_BLOCK + 100 : 2 * CDF_BLOCK] = 1e-4
    rows = 4000
    drawn = _inverse_cdf(weights.expand(rows, -1), list(range(rows)),
                         {i: torch.Generator().manual_seed(i) for i in range(rows)})
    uniforms = torch.tensor([torch.rand(1, dtype=torch.float64, generator=torch.Generator().manual_seed(i)).item()
                             for i in range(rows)], dtype=torch.float64)
    cdf = weights.double().cumsum(0)
    expected = torch.searchsorted(cdf, uniforms * cdf[-1], right=True)
    assert torch.equal(drawn, expected)
    counts = torch.bincount(drawn, minlength=vocab).float()
    assert counts[weights == 0].sum() == 0
    kept = weights > 1e-3
    probs = weights[kept] / weights[kept].sum()
    statistic, dof = _chi_square(counts[kept], probs)
    assert statistic < CRITICAL[dof], f"chi-square {statistic:.1f}; counts {counts[kept].tolist()}"


def test_first_above_never_lands_past_the_last_entry_with_mass():
    cdf = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.0, 0.2, 0.2, 0.7]], dtype=torch.float64)
    assert _first_above(cdf, torch.tensor([0.5, 0.7], dtype=torch.float64)).tolist() == [2, 3]  # target = total
    assert _first_above(cdf, torch.tensor([0.1, 0.0], dtype=torch.float64)).tolist() == [2, 1]  # skips empty entries


def test_seed_reproduces_and_different_seeds_differ():
    a = _draws(SamplingParams(temperature=1.0, seed=123), 200)
    b = _draws(SamplingParams(temperature=1.0, seed=123), 200)
    c = _draws(SamplingParams(temperature=1.0, seed=124), 200)
    assert torch.equal(a, b)
    ra, rc = row(SamplingParams(temperature=1.0, seed=123)), row(SamplingParams(temperature=1.0, seed=124))
    seq_a = [sample([ra]).token_ids[0] for _ in range(50)]
    seq_c = [sample([rc]).token_ids[0] for _ in range(50)]
    assert seq_a != seq_c
    assert not torch.equal(a, c) or seq_a != seq_c


def test_a_seeded_request_draws_the_same_tokens_whatever_else_is_in_the_batch():
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=5)
    generator = torch.Generator().manual_seed(5)
    alone = [sample([row(params, generator=generator)]).token_ids[0] for _ in range(30)]
    generator = torch.Generator().manual_seed(5)
    others = [row(SamplingParams(temperature=1.3, top_k=3)), row(SamplingParams(temperature=0)),
              row(SamplingParams(temperature=0.5, seed=99, repetition_penalty=1.3), output=[1, 2])]
    batched = [sample([others[0], row(params, generator=generator), *others[1:]]).token_ids[1] for _ in range(30)]
    assert batched == alone and len(set(alone)) > 1


def test_batched_rows_match_rows_sampled_one_by_one():
    """Every greedy row, penalties, min_tokens and logprobs included, equals the same row sampled alone."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    rows = [row(SamplingParams(temperature=0, logprobs=3)),
            row(SamplingParams(temperature=0, repetition_penalty=1.7, frequency_penalty=0.6), prompt=[4, 9], output=[9, 9, 2]),
            row(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7]), output=[1]),
            row(SamplingParams(temperature=0, presence_penalty=1.5, logprobs=0), output=[11, 30]),
            row(SamplingParams(temperature=0, logprobs=5), prompt=[1, 2, 3]),
            row(SamplingParams(temperature=0, ignore_eos=True, min_tokens=2))]
    for i in range(6):  # make each row's argmax something a setting changes
        logits[i, [7, 9, 11, 30, 3]] += 8
    together = sample(rows, logits.clone(), eos=[3])
    for i, r in enumerate(rows):
        alone = sample([r], logits[i : i + 1].clone(), eos=[3])
        assert together.token_ids[i] == alone.token_ids[0], f"row {i}"
        assert (together.logprobs[i], together.ranks[i], together.top_logprobs[i]) == (
            alone.logprobs[0], alone.ranks[0], alone.top_logprobs[0]), f"row {i}"
    assert together.token_ids[2] not in (3, 7) and together.token_ids[5] == 3


def test_allowed_token_bitmask_restricts_every_row():
    torch.manual_seed(1)
    logits = torch.randn(3, 70)
    allowed = [{5, 40}, {69}, {0, 33, 64}]
    bitmask = torch.zeros(3, 3, dtype=torch.int32)
    for i, tokens in enumerate(allowed):
        for t in tokens:
            bitmask[i, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
    rows = [row(SamplingParams(temperature=0)), row(SamplingParams(temperature=1.0, seed=3)),
            row(SamplingParams(temperature=2.0, seed=4))]
    for _ in range(20):
        out = sample(rows, logits.clone(), bitmask=bitmask)
        assert all(t in a for t, a in zip(out.token_ids, allowed))


@pytest.mark.parametrize("vocab", [64, 70, 96, 31])
def test_token_bitmask_bans_exactly_the_zero_bits(vocab):
    """Whole-word bans, whole-word allows, mixed words, the sign bit and a last word partly used, against a bit by
    bit reference."""
    generator = torch.Generator().manual_seed(vocab)
    num_words = (vocab + 31) // 32
    words = torch.randint(-2**31, 2**31 - 1, (5, num_words), generator=generator, dtype=torch.int64)
    words[1] = 0
    words[2] = -1
    words[3, 0], words[4, -1] = -2**31, 1  # only token 31 of the first word; only the last word's first token
    bitmask = words.to(torch.int32)
    logits = torch.randn(5, vocab, generator=generator)
    expected = logits.clone()
    for r in range(5):
        for t in range(vocab):
            if not (int(words[r, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = float("-inf")
    apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)
    assert logits[1].isinf().all() and not logits[2].isinf().any()


def test_greedy_rows_under_a_grammar_equal_the_argmax_of_the_masked_row():
    """Greedy rows skip the mask when their argmax is allowed: the tokens must equal masking every row first, ties
    included (an earlier banned token with the same logit), with random rows beside them still masked."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 100, generator=generator)
    logits[3, 10] = logits[3, 60] = logits[3].max() + 1  # a tie: token 10 banned, token 60 allowed
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, 4), generator=generator, dtype=torch.int64).to(torch.int32)
    bitmask[3] = 0
    bitmask[3, 1] = 1 << (60 - 32)
    bitmask[0] = -1  # a row the grammar leaves free
    top = logits.argmax(-1)
    bitmask[1, top[1] // 32] = -1  # argmax allowed
    bitmask[2, top[2] // 32] = 0  # argmax banned
    expected = logits.clone()
    for r in range(6):
        for t in range(100):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = float("-inf")
    rows = [row(SamplingParams(temperature=0)) for _ in range(5)] + [row(SamplingParams(temperature=1.0, seed=1))]
    raw = logits.clone()
    out = sample(rows, logits, bitmask=bitmask)
    assert out.token_ids[:5] == expected[:5].argmax(-1).tolist() and out.token_ids[3] == 60
    assert torch.equal(logits, raw)  # the raw logits (the logprobs' distribution) are left alone
    assert (int(bitmask[5, out.token_ids[5] // 32]) >> (out.token_ids[5] % 32)) & 1
    assert out.logprobs == pytest.approx(raw.log_softmax(-1).gather(1, torch.tensor(out.token_ids)[:, None])
                                         .squeeze(1).tolist())


def test_greedy_picks_argmax_and_reports_raw_logprobs():
    out = sample([row(SamplingParams(temperature=0, logprobs=3))])
    raw = LOGITS.log_softmax(-1)
    assert out.token_ids[0] == 0 and out.ranks[0] == 1
    assert out.logprobs[0] == pytest.approx(float(raw[0]))
    assert [t for t, _ in out.top_logprobs[0]] == [0, 1, 2]


def test_min_tokens_masks_stop_ids():
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    assert sample([row(params)], eos=[0]).token_ids == [2]
    assert sample([row(params, output=[5, 5])], eos=[0]).token_ids == [0]


def test_penalties():
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    logits = LOGITS[None].clone()
    SamplingMetadata.build([row(params, prompt=[0], output=[1, 1, 6])], 8, set()).penalties.apply(logits)
    out = logits[0]
    assert out[0] == pytest.approx(2.0 / 2)  # repetition only (prompt)
    assert out[1] == pytest.approx(1.5 / 2 - 0.5 - 2 * 0.25)  # repetition + presence + 2x frequency
    assert out[6] == pytest.approx(-1.0 * 2 - 0.5 - 0.25)  # negative logits are multiplied
    assert out[2] == LOGITS[2]


def test_filters_keep_at_least_one_token():
    kept = filter_logits(LOGITS[None].clone(), top_k=None, top_p=torch.tensor([1e-6]), min_p=None)[0]
    assert torch.isfinite(kept).sum() == 1 and torch.isfinite(kept[0])


def _critical(dof: int) -> float:
    """Chi-square critical value at p = 0.001 (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3


@pytest.mark.parametrize("params, path", [
    (dict(top_p=0.9), "candidates"), (dict(top_k=40, top_p=0.8), "candidates"), (dict(min_p=0.05), "candidates"),
    (dict(top_k=200), "full"), (dict(top_p=0.9999), "full"), (dict(min_p=1e-6), "full"),
    (dict(top_k=300, top_p=0.995), "full"),
])
def test_candidate_sampling_follows_the_filtered_distribution(monkeypatch, params, path):
    """Rows sampled among the 64 most likely of 500 tokens (or on the full path when what they keep may lie past
    those) follow the distribution filter_logits defines over the whole vocabulary."""
    import ownllm.worker.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "CANDIDATES", 64)
    full_path_calls = []
    reference = sampler_module.filter_logits
    monkeypatch.setattr(sampler_module, "filter_logits", lambda *a: full_path_calls.append(1) or reference(*a))
    torch.manual_seed(3)
    logits = torch.randn(500) * 3.0
    sp = SamplingParams(temperature=0.9, seed=1, **params)
    one = row(sp)
    counts = torch.zeros(500)
    for _ in range(40):
        for token_id in sample([one] * 100, logits.expand(100, -1).clone()).token_ids:
            counts[token_id] += 1
    assert bool(full_path_calls) == (path == "full")
    k = torch.tensor([sp.top_k])
    expected = filter_logits((logits / 0.9)[None], k, torch.tensor([sp.top_p]), torch.tensor([sp.min_p]))[0].softmax(-1)
    assert counts[expected == 0].sum() == 0, "sampled a token the filters exclude"
    order = expected.argsort(descending=True)
    bins_e, bins_c, acc_e, acc_c = [], [], 0.0, 0.0
    for t in order[expected[order] > 0].tolist():  # bins of at least 5 expected draws
        acc_e, acc_c = acc_e + float(expected[t]) * counts.sum().item(), acc_c + float(counts[t])
        if acc_e >= 5:
            bins_e.append(acc_e), bins_c.append(acc_c)
            acc_e = acc_c = 0.0
    if acc_e and bins_e:
        bins_e[-1] += acc_e
        bins_c[-1] += acc_c
    e, c = torch.tensor(bins_e), torch.tensor(bins_c)
    statistic = float(((c - e) ** 2 / e).sum())
    assert len(bins_e) > 1 and statistic < _critical(len(bins_e) - 1), f"chi-square {statistic:.1f}, {len(bins_e)} bins"
