"""Agreement with llama.cpp on the real Qwen2.5-Coder Q4_K_M files (Q4_K, Q6_K; the 0.5B also Q5_0 and Q8_0),
fetched once by bench/fetch_models.py: the integer kernels (kernels/kquant_vnni.cpp, activations rounded to 8 bits
as llama.cpp rounds them) agree with llama.cpp at least as well as the float kernels (kernels/block_matmul.cpp).

Agreement is teacher-forced: llama.cpp's greedy continuation of each prompt is fed to ownllm as part of the prompt,
and at each position ownllm's top-1 token (from the prompt's logprobs) is compared with llama.cpp's. Unlike the
length of a free-running common prefix, one near-tie does not decide the rest of a prompt. The prompt goes through
in chunks of 4 tokens, so every matmul takes the path (and the numbers) of decoding: the integer kernels' rows
come out the same at any row count, and the float kernels take their factored form up to 4 rows."""

from __future__ import annotations

import pytest

from bench.fetch_models import fetch
from ownllm import LLM, SamplingParams
from ownllm.kernels.build import cpu_has_vnni

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not cpu_has_vnni(), reason="the integer kernels need AVX-512 VNNI")]
NEW_TOKENS = 32
PROMPTS = ["Write a Python function that returns the n-th Fibonacci number, iteratively.",
           "Explain in two sentences what a hash map is.",
           "Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "List three differences between TCP and UDP.",
           "Write a SQL query that returns the ten most recent orders with their customer names.",
           "What does the Python keyword `yield` do? Give a small example."]


def llama_cpp_continuations(path: str, prompts: list[list[int]]) -> list[list[int]]:
    llama_cpp = pytest.importorskip("llama_cpp")
    reference = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=2, verbose=False)
    continuations = []
    for ids in prompts:
        tokens = []
        for token in reference.generate(ids, temp=0.0, reset=True):
            tokens.append(token)
            if len(tokens) == NEW_TOKENS:
                break
        continuations.append(tokens)
    return continuations


def teacher_forced_matches(llm: LLM, prompts: list[list[int]], continuations: list[list[int]]) -> int:
    """How many of llama.cpp's continuation tokens are ownllm's top-1 given the same preceding tokens."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    matches = 0
    for ids, continuation in zip(prompts, continuations):
        scored = llm.generate({"prompt_token_ids": ids + continuation}, params)[0].prompt_logprobs
        for position, token in enumerate(continuation, start=len(ids)):
            top = max(scored[position].items(), key=lambda item: item[1].logprob)[0]
            matches += top == token
    return matches


@pytest.mark.parametrize("name", ["0.5b", "1.5b"])
def test_integer_kernels_agree_with_llama_cpp_at_least_as_well(name, monkeypatch):
    import ownllm.layers.quant as quant

    path = str(fetch(name))
    llm = LLM(path, enable_prefix_caching=False, kv_cache_memory=2**28, max_num_batched_tokens=4)
    prompts = [llm.chat_prompt([{"role": "user", "content": text}])["prompt_token_ids"] for text in PROMPTS]
    continuations = llama_cpp_continuations(path, prompts)
    integer = teacher_forced_matches(llm, prompts, continuations)
    monkeypatch.setattr(quant, "VNNI_MAX_ROWS", {})  # the float kernels only
    floating = teacher_forced_matches(llm, prompts, continuations)
    total = sum(map(len, continuations))
    print(f"{name}: teacher-forced agreement with llama.cpp: integer {integer}/{total}, float {floating}/{total}")
    assert integer >= floating
