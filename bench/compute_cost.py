"""What `compute` costs in wall time and tokens: one greedy request, one request with compute samples=N (one shared
prefill, one decode batch), and N separate sampled requests sent one after another; then plain vote against vote
with early_stop on the same problems (sampled tokens and accuracy). Offline engine, 2 threads.

    python bench/compute_cost.py [--model qwen1.5b] [--family algebra] [--problems 20] [--samples 8]

--model: a path, or "qwen1.5b" (Qwen2.5-Coder-1.5B-Instruct Q4_K_M, fetched by bench/fetch_models.py); default the
bundled SmolLM2-135M. Writes bench/RESULTS.md ("Inference compute: cost, <model>"). Never asserts on timings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402
from ownllm import LLM, SamplingParams  # noqa: E402
from ownllm.evals.tasks import problems  # noqa: E402


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--family", default="algebra")
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-only", action="store_true", help="skip the vote vs early_stop comparison "
                        "(`ownllm eval` measures it on more problems)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model
    if model == "qwen1.5b":
        from bench.fetch_models import fetch

        model = str(fetch("1.5b"))
    llm = LLM(model)
    chosen = problems(args.family, "heldout", args.problems)
    chats = [[{"role": "user", "content": p.prompt}] for p in chosen]
    sampled = SamplingParams(temperature=0.7, max_tokens=args.max_tokens, seed=0)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    n = args.samples
    llm.chat(chats[0], greedy)  # warm up
    rows = {"greedy": [], f"compute samples={n}": [], f"{n} requests in a row": []}
    for chat in chats[: min(5, len(chats))]:
        rows["greedy"].append(timed(lambda: llm.chat(chat, greedy))[0])
        rows[f"compute samples={n}"].append(timed(lambda: llm.chat(chat, sampled, compute={"samples": n}))[0])
        rows[f"{n} requests in a row"].append(timed(lambda: [llm.chat(chat, sampled) for _ in range(n)])[0])
    medians = {name: statistics.median(times) for name, times in rows.items()}
    lines = ["| run | median s / problem | vs greedy |", "|---|---|---|"]
    lines += [f"| {name} | {m:.2f} | {m / medians['greedy']:.2f}x |" for name, m in medians.items()]
    votes = {}
    for name, field in () if args.timing_only else (("vote", {"samples": n, "answer": "number"}),
                        ("vote early_stop", {"samples": n, "answer": "number", "early_stop": True})):
        tokens = correct = saved = 0
        for problem, chat in zip(chosen, chats):
            out = llm.chat(chat, sampled, compute=field)[0].compute
            tokens += out.completion_tokens
            saved += out.samples_saved
            correct += problem.is_correct(out.answer)
        votes[name] = (tokens, correct, saved)
    if votes:
        lines += ["", f"| {args.problems} {args.family} problems, {n} samples | sampled tokens | correct | samples saved |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {t} | {c}/{args.problems} | {s} |" for name, (t, c, s) in votes.items()]
        plain, early = votes["vote"][0], votes["vote early_stop"][0]
        lines.append(f"\nearly_stop sampled {100 * (1 - early / plain):.0f}% fewer tokens than the plain vote.")
    body = (f"Command: `python bench/compute_cost.py {' '.join(sys.argv[1:])}`\n"
            f"Model: {model or 'bundled SmolLM2-135M-Instruct Q4_1'}; {args.threads} threads; max_tokens "
            f"{args.max_tokens}, temperature 0.7 (seed 0), held-out {args.family} problems; timings: median over "
            f"the first {min(5, len(chats))} problems. Machine shared with other jobs: timings are indicative.\n\n"
            + "\n".join(lines) + "\n")
    print(body)
    if not args.no_write:
        write_section(f"Inference compute: cost, {Path(model).name if model else 'bundled SmolLM2-135M'}", body)


if __name__ == "__main__":
    main()
