"""Tensor parallel T = 2 against T = 1 on the Llama-3.2-1B shape (random bfloat16 weights, bench/.cache/):
decode tokens/s and the time the workers spend in all-reduce (and the logits' all-gather) per step.

    python bench/tensor_parallel.py [--sizes 1,2] [--new-tokens 32] [--batches 1,8] [--repeats 2] [--threads 2]

Each size loads the model through `ownllm.LLM(tensor_parallel_size=T)`, greedy, EOS ignored, prefix caching off.
Decode tokens/s = batch * (new_tokens - 1) / (time of the full run - time of a 1-token run), median of `repeats`.
T = 1 runs in this process with --threads threads; T = 2 runs 2 worker processes of --threads / 2 threads each,
so both use the same cores. On one machine with few cores this measures the overhead of splitting (the
collectives, the process hops and each rank's smaller matmuls), not a speed-up: tensor parallel pays off when
each rank has a device (or a socket's memory bandwidth) of its own. Results go to bench/RESULTS.md
(section "Tensor parallel").
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402
from bench.harness_models import MODELS, ensure_built  # noqa: E402

SHAPE = "llama-3.2-1b"
NOTE = ("On one machine whose cores the ranks share, this measures tensor parallelism's overhead, not a speed-up: "
        "the split pays off only when each rank has a device (or memory bandwidth) of its own.")


def run(llm, batch: int, new_tokens: int) -> float:
    from ownllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": [10 + i, 11, 12, 13, 14, 15, 16, 17]} for i in range(batch)]
    started = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - started


def measure(path: Path, size: int, batches: list[int], new_tokens: int, repeats: int, threads: int) -> list[dict]:
    from ownllm import LLM

    torch.set_num_threads(threads)  # T = 2: each worker takes threads / 2
    llm = LLM(str(path), dtype="bfloat16", tensor_parallel_size=size, enable_prefix_caching=False,
              max_num_seqs=max(batches))
    executor = llm.engine.core.executor
    stats = getattr(executor, "collective_stats", None)
    rows = []
    run(llm, 1, 2)  # warm-up
    for batch in batches:
        rates, comm_per_step, collectives_per_step = [], [], []
        for _ in range(repeats):
            one = run(llm, batch, 1)
            if stats:
                stats()  # reset
            full = run(llm, batch, new_tokens)
            rates.append(batch * (new_tokens - 1) / max(full - one, 1e-9))
            if stats:
                seconds, count = stats()[0]  # rank 0's collectives over the full run's new_tokens steps
                comm_per_step.append(seconds / new_tokens * 1000)
                collectives_per_step.append(count / new_tokens)
        rows.append({"size": size, "batch": batch, "tokens_per_s": statistics.median(rates),
                     "comm_ms_per_step": statistics.median(comm_per_step) if comm_per_step else None,
                     "collectives_per_step": statistics.median(collectives_per_step) if collectives_per_step else None})
        print(rows[-1], flush=True)
    executor.shutdown()
    del llm
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,2")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    ensure_built(SHAPE, hf_only=True)
    path = next(m.path() for m in MODELS if m.shape == SHAPE and not m.is_gguf)
    batches = [int(b) for b in args.batches.split(",")]
    rows = [row for size in (int(s) for s in args.sizes.split(","))
            for row in measure(path, size, batches, args.new_tokens, args.repeats, args.threads)]
    base = {row["batch"]: row["tokens_per_s"] for row in rows if row["size"] == 1}
    lines = [f"`python bench/tensor_parallel.py --sizes {args.sizes} --new-tokens {args.new_tokens} --batches "
             f"{args.batches} --repeats {args.repeats} --threads {args.threads}` on "
             f"{platform.processor() or platform.machine()}, {args.threads} threads in all, {SHAPE} bf16 (random "
             "weights).", "", NOTE, "",
             "| T | batch | decode tok/s | vs T=1 | collectives ms/step (rank 0) | collectives/step |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row['tokens_per_s'] / base[row['batch']]:.2f}x" if row["batch"] in base else "-"
        comm = f"{row['comm_ms_per_step']:.2f}" if row["comm_ms_per_step"] is not None else "-"
        count = f"{row['collectives_per_step']:.0f}" if row["collectives_per_step"] is not None else "-"
        lines.append(f"| {row['size']} | {row['batch']} | {row['tokens_per_s']:.1f} | {ratio} | {comm} | {count} |")
    body = "\n".join(lines) + "\n"
    print(body)
    print(NOTE)
    write_section("Tensor parallel", body)


if __name__ == "__main__":
    main()
