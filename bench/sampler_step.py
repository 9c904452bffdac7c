"""One sampling step for many rows over a large vocabulary: the batched sampler against the per-request loop it
replaced (kept here, verbatim in behaviour, as the reference).

    python bench/sampler_step.py [--rows 64] [--vocab 151936] [--repeats 20] [--threads 2]

Rows get mixed parameters (greedy; temperature with top-k, top-p or min-p; penalties over 300-token
histories; seeds; logprobs) and real logits: Qwen2.5-Coder-0.5B-Instruct's (vocabulary 151,936) at 64
positions of a code prompt (bench/fetch_models.py fetches it). Reports the median time of a step for each,
and writes the result to bench/RESULTS.md ("Batched sampler").
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402
from ownllm.sampling_params import SamplingParams  # noqa: E402
from ownllm.worker.sampler import Sampler, SamplingMetadata, SamplingRow  # noqa: E402


def loop_sample(logits: torch.Tensor, rows: list[SamplingRow], eos: set[int]) -> list[int]:
    """The per-request sampler this replaced: penalties, min_tokens, filters and a draw, one row at a time."""
    raw = logits.log_softmax(-1)
    out = []
    for i, row in enumerate(rows):
        x, p = logits[i].clone(), row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.token_ids)), dtype=torch.long)
            v = x[seen]
            x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            ids, counts = torch.tensor(row.output_token_ids).unique(return_counts=True)
            x[ids] -= p.frequency_penalty * counts.float() + p.presence_penalty
        if p.is_greedy:
            token = int(x.argmax())
        else:
            x = x / p.temperature
            if p.top_k:
                x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
            if p.top_p < 1.0:
                sorted_x, order = torch.sort(x, descending=True)
                probs = sorted_x.softmax(-1)
                drop = probs.cumsum(-1) - probs >= p.top_p
                drop[0] = False
                x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
            if p.min_p:
                probs = x.softmax(-1)
                x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
            probs = x.softmax(-1)
            token = int((probs / torch.empty_like(probs).exponential_(generator=row.generator)).argmax())
        if p.logprobs is not None:
            int((raw[i] > raw[i, token]).sum())
            if p.logprobs:
                raw[i].topk(p.logprobs)
        out.append(token)
    return out


def mixed_rows(count: int, vocab: int) -> list[SamplingRow]:
    rng = random.Random(0)
    choices = [dict(temperature=0), dict(temperature=0.7, top_p=0.9), dict(temperature=0.8, top_k=40),
               dict(temperature=1.0, min_p=0.05), dict(temperature=0.6, top_p=0.95, top_k=50, repetition_penalty=1.1),
               dict(temperature=0, presence_penalty=0.5, frequency_penalty=0.3, logprobs=5)]
    rows = []
    for i in range(count):
        params = SamplingParams(**choices[i % len(choices)], seed=i if i % 3 == 0 else None)
        generator = torch.Generator().manual_seed(i) if params.seed is not None else None
        history = [rng.randrange(vocab) for _ in range(300)]
        rows.append(SamplingRow(params, history, 100, generator=generator))
    return rows


def model_logits(num_rows: int) -> torch.Tensor:
    """[num_rows, vocab] float32: the real model's next-token logits along a code prompt."""
    from bench.fetch_models import fetch
    from bench.spec_decode import CODE
    from ownllm import LLM
    from ownllm.worker.input_batch import Span, build_inputs

    llm = LLM(str(fetch("0.5b")), kv_cache_memory=2**27)
    runner = llm.runner
    ids = llm.tokenizer.encode(CODE)[:num_rows]
    blocks = list(range(-(-len(ids) // runner.block_size)))
    with torch.inference_mode():
        input_ids, meta = build_inputs([Span(ids, 0, blocks)], runner.kv_cache, runner.backends.attention, "cpu")
        return runner.model.compute_logits(runner.model(input_ids, meta)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logits = model_logits(args.rows)
    args.vocab = logits.shape[1]
    rows = mixed_rows(args.rows, args.vocab)
    sampler = Sampler()

    def batched() -> None:
        sampler(logits, SamplingMetadata.build(rows, args.vocab, {2}))

    timings: dict[str, list[float]] = {"per-request loop": [], "batched": []}
    for _ in range(args.repeats):
        for name, step in (("per-request loop", lambda: loop_sample(logits, rows, {2})), ("batched", batched)):
            start = time.perf_counter()
            step()
            timings[name].append(time.perf_counter() - start)
    loop_ms, batched_ms = (statistics.median(timings[n][2:]) * 1e3 for n in timings)
    line = f"| {args.rows} | {args.vocab} | {loop_ms:.1f} | {batched_ms:.1f} | {loop_ms / batched_ms:.1f}x |"
    print(line)
    write_section("Batched sampler", (
        f"Command: `python bench/sampler_step.py --rows {args.rows} --repeats {args.repeats} --threads {args.threads}`: "
        "one sampling step over Qwen2.5-Coder-0.5B's logits at 64 positions of a code prompt, mixed parameters "
        "(greedy, top-k, top-p, min-p, penalties over 300-token histories, seeds, logprobs), median of the runs "
        "after the second, the two alternating.\n\n"
        "| rows | vocab | per-request loop ms | batched ms | speed-up |\n|---|---|---|---|---|\n" + line + "\n"))


if __name__ == "__main__":
    main()
