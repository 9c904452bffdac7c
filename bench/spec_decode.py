"""Speculative decoding on real weights, batch 1, side by side with llama.cpp in one process, taking turns.

    python bench/spec_decode.py [--new-tokens 256] [--repeats 3] [--threads 2] [--k 8]

Target: Qwen2.5-Coder-1.5B-Instruct Q4_K_M; draft: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (same tokenizer), both
fetched by bench/fetch_models.py. Two chat prompts: a code edit (a ~60-line Python function given in full, "add
type hints and docstrings, change nothing else": the answer copies most of the prompt) and free writing
(drafts mostly miss). Runs, alternating run by run: ownllm without speculation, with ngram (prompt lookup),
with the 0.5B as draft model; llama.cpp without speculation and with its prompt lookup
(LlamaPromptLookupDecoding, num_pred_tokens = --k); and each model alone without speculation. Greedy, 2
threads; decode tokens/s = (new tokens - 1) / time after the first token, median of the runs after the first.
Also checks that every ownllm run gives the same tokens as ownllm without speculation. Writes bench/RESULTS.md
("Speculative decoding").
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
from bench.fetch_models import fetch  # noqa: E402

CODE = '''def merge_intervals(intervals, min_gap=0):
    if not intervals:
        return []
    ordered = sorted(intervals, key=lambda pair: (pair[0], pair[1]))
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        last = merged[-1]
        if start <= last[1] + min_gap:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return [tuple(pair) for pair in merged]


def parse_ranges(text, separator=",", default_width=1):
    ranges = []
    for chunk in text.split(separator):
        chunk = chunk.strip()
        if not chunk:
            continue
        if "-" in chunk:
            left, right = chunk.split("-", 1)
            start, end = int(left), int(right)
        else:
            start = int(chunk)
            end = start + default_width - 1
        if end < start:
            raise ValueError(f"range {chunk!r} ends before it starts")
        ranges.append((start, end))
    return ranges


def summarize(intervals, unit="items"):
    total = 0
    longest = None
    for start, end in intervals:
        width = end - start + 1
        total += width
        if longest is None or width > longest[1] - longest[0] + 1:
            longest = (start, end)
    lines = [f"{len(intervals)} ranges covering {total} {unit}"]
    if longest is not None:
        lines.append(f"longest: {longest[0]}-{longest[1]}")
    return "\\n".join(lines)


def main(argv):
    text = argv[1] if len(argv) > 1 else "1-3, 5, 8-10, 9-12"
    intervals = merge_intervals(parse_ranges(text), min_gap=1)
    print(summarize(intervals))
    return 0
'''
PROMPTS = {
    "code edit": "Add type hints and docstrings to this Python code. Change nothing else, and give the whole "
                 "code back in one block.\n\n```python\n" + CODE + "```",
    "free writing": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def timed(tokens) -> tuple[float, float, float, int]:
    """(start, first token time, end, tokens) over an iterator yielding lists of new token ids."""
    start, first, count = time.perf_counter(), None, 0
    for new in tokens:
        first = first or time.perf_counter()
        count += len(new)
    return start, first, time.perf_counter(), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=8, help="tokens drafted per step by ngram and llama.cpp's lookup")
    parser.add_argument("--draft-k", type=int, default=4, help="tokens drafted per step by the draft model")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from ownllm import LLM, SamplingParams

    target, draft = str(fetch("1.5b")), str(fetch("0.5b"))
    new = args.new_tokens
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    ours = {
        "ownllm 1.5B": LLM(target, enable_prefix_caching=False),
        "ownllm 1.5B + ngram": LLM(target, enable_prefix_caching=False, speculative_config=ngram),
        "ownllm 1.5B + 0.5B draft": LLM(target, enable_prefix_caching=False, speculative_config={
            "method": "draft_model", "model": draft, "num_speculative_tokens": args.draft_k}),
        "ownllm 0.5B": LLM(draft, enable_prefix_caching=False),
    }
    n_ctx = 2048
    theirs = {
        "llama.cpp 1.5B": Llama(target, n_threads=args.threads, n_ctx=n_ctx, verbose=False),
        "llama.cpp 1.5B + lookup": Llama(target, n_threads=args.threads, n_ctx=n_ctx, verbose=False, logits_all=True,
                                         draft_model=LlamaPromptLookupDecoding(num_pred_tokens=args.k)),
        "llama.cpp 0.5B": Llama(draft, n_threads=args.threads, n_ctx=n_ctx, verbose=False),
    }
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    tokenizer = ours["ownllm 1.5B"].tokenizer

    def run_ours(llm, prompt_ids):
        pieces = ([0] for _ in llm.stream({"prompt_token_ids": prompt_ids}, params))
        start, first, end, _ = timed(pieces)
        return (start, first, end, len(llm.last_output.token_ids)), llm.last_output.token_ids

    def run_theirs(llm, prompt_ids):
        out = []

        def tokens():
            for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
                out.append(token)
                yield [token]
                if len(out) >= new:
                    return
        llm.reset()
        return timed(tokens()), out

    rows = []
    for label, text in PROMPTS.items():
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        speeds: dict[str, list[float]] = {name: [] for name in [*ours, *theirs]}
        reference, agreement = None, {}
        for repeat in range(args.repeats):
            for name, llm in [*ours.items(), *theirs.items()]:
                (start, first, end, count), token_ids = (run_ours if name in ours else run_theirs)(llm, prompt_ids)
                speeds[name].append((new - 1) / (end - first))
                if name == "ownllm 1.5B":
                    reference = token_ids
                elif name.startswith("ownllm 1.5B"):  # greedy tokens in common with no speculation
                    agreement[name] = next((i for i, (a, b) in enumerate(zip(token_ids, reference)) if a != b), new)
            print(label, {n: round(s[-1], 1) for n, s in speeds.items()}, flush=True)
        median = {n: statistics.median(s[1:] if len(s) > 1 else s) for n, s in speeds.items()}
        accept = {}
        for name in ("ownllm 1.5B + ngram", "ownllm 1.5B + 0.5B draft"):
            stats = ours[name].engine.core.stats()
            drafted, accepted = stats["spec_decode_draft_tokens_total"], stats["spec_decode_accepted_tokens_total"]
            accept[name] = (accepted / max(drafted, 1), 1 + accepted / max(stats["spec_decode_sampling_steps_total"], 1))
        rows.append((label, median, accept, agreement))
        for llm in ours.values():  # acceptance counted per prompt
            core = llm.engine.core
            core.num_draft_tokens_total = core.num_accepted_tokens_total = core.num_sampling_steps_total = 0
    base = "ownllm 1.5B"
    lines = ["| prompt | tool | decode tok/s | vs ownllm 1.5B | acceptance | mean accepted length | same greedy tokens |",
             "|---|---|---|---|---|---|---|"]
    for label, median, accept, agreement in rows:
        for name, speed in median.items():
            rate, length = accept.get(name, (None, None))
            same = f"first {agreement[name]} of {new}" if name in agreement else ""
            lines.append(f"| {label} | {name} | {speed:.1f} | {speed / median[base]:.2f}x | "
                         f"{'' if rate is None else f'{rate:.0%}'} | {'' if length is None else f'{length:.2f}'} | {same} |")
    table = "\n".join(lines)
    print(table)
    ratios = "; ".join(f"{label}: ngram / llama.cpp lookup {m['ownllm 1.5B + ngram'] / m['llama.cpp 1.5B + lookup']:.2f}x, "
                       f"1.5B plain {m['ownllm 1.5B'] / m['llama.cpp 1.5B']:.2f}x, 0.5B plain {m['ownllm 0.5B'] / m['llama.cpp 0.5B']:.2f}x"
                       for label, m, _, _ in rows)
    print(ratios)
    if not args.no_write:
        write_section("Speculative decoding", (
            f"Command: `python bench/spec_decode.py --new-tokens {new} --repeats {args.repeats} --threads {args.threads} "
            f"--k {args.k} --draft-k {args.draft_k}`: Qwen2.5-Coder-1.5B-Instruct Q4_K_M, batch 1, greedy, EOS ignored, "
            "every tool in one process taking turns run by run (median of the runs after the first). ngram: "
            f"k={args.k}, lookup 2..4 tokens; draft model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, k={args.draft_k}; "
            f"llama.cpp: LlamaPromptLookupDecoding(num_pred_tokens={args.k}). 'same greedy tokens': how many of the "
            "new tokens equal ownllm's without speculation (on K-quant files a verify step of more than 4 rows "
            "multiplies bf16-rounded weights, as batching does, so a near-tie may part the paths).\n\n"
            + table + "\n\n" + ratios + "\n"))


if __name__ == "__main__":
    main()
