"""Batch-1 decode of ownllm and llama.cpp side by side in one process, taking turns run by run.

    python bench/side_by_side.py [--new-tokens 128] [--prompt-tokens 128] [--repeats 5] [--threads 2] [--models Q4_K_M,bundled]
        [--ab-decode-stack]

The comparison harness runs each tool in a process of its own, one after another, so memory bandwidth
drifting between them (36-55 GB/s on this shared machine) moves their ratio by +-15%. Here both tools
load once and alternate runs, so drift hits them alike. Pairs: the harness's random-weight Llama-3.2-1B
(ownllm: the bf16 HF folder; llama.cpp: its F16 GGUF), its Q8_0 and Q4_K_M GGUFs, the SmolLM2-135M
shape in bf16 / F16 (as the 1B) and as Q4_K_M (mostly Q5_0), the bundled SmolLM2-135M-Instruct Q4_1 GGUF and the real Qwen2.5-Coder 1.5B and
0.5B Q4_K_M GGUFs (bench/fetch_models.py; the same file for both).
Prompts of random ids (128 tokens, or --prompt-tokens: decode after a long prompt attends over all of it),
greedy, EOS ignored; decode tokens/s = (new tokens - 1) / time after the first token; the median of the
repeats after the first. Results go to bench/RESULTS.md (section "Batch-1 decode, side by side", with the
prompt length in its title when not 128).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402
from bench.harness_models import MODELS, ensure_built  # noqa: E402


def pairs(wanted: list[str]) -> list[tuple[str, str, str, str]]:
    """(label, ownllm model, ownllm dtype or "", llama.cpp GGUF) for the labels containing one of `wanted`; only
    those are built or fetched."""
    from bench.fetch_models import fetch
    from ownllm.loader.resolve import bundled_model_path

    def random_shape(shape: str, weights: str) -> str:
        ensure_built(shape)
        return str(next(m for m in MODELS if m.shape == shape and m.weights == weights).path())

    def same_file(path) -> tuple[str, str, str]:
        path = str(path())
        return path, "", path

    candidates = {
        "llama-3.2-1b (bf16 / F16)": lambda: (random_shape("llama-3.2-1b", "bf16"), "bfloat16",
                                              random_shape("llama-3.2-1b", "F16")),
        "llama-3.2-1b Q8_0": lambda: same_file(lambda: random_shape("llama-3.2-1b", "Q8_0")),
        "smollm2-135m (bf16 / F16)": lambda: (random_shape("smollm2-135m", "bf16"), "bfloat16",
                                              random_shape("smollm2-135m", "F16")),
        "smollm2-135m F16 GGUF": lambda: same_file(lambda: random_shape("smollm2-135m", "F16")),
        "llama-3.2-1b Q4_K_M": lambda: same_file(lambda: random_shape("llama-3.2-1b", "Q4_K_M")),
        "smollm2-135m Q4_K_M": lambda: same_file(lambda: random_shape("smollm2-135m", "Q4_K_M")),
        "bundled SmolLM2-135M Q4_1": lambda: same_file(bundled_model_path),
        # the real files people download (bench/fetch_models.py fetches them when missing)
        "Qwen2.5-Coder-1.5B Q4_K_M (real)": lambda: same_file(lambda: fetch("1.5b")),
        "Qwen2.5-Coder-0.5B Q4_K_M (real)": lambda: same_file(lambda: fetch("0.5b")),
    }
    return [(label, *make()) for label, make in candidates.items() if any(w in label for w in wanted)]


def timed(tokens) -> tuple[float, float, float]:
    """(start, first token time, end) over an iterator that yields once per generated token."""
    start = time.perf_counter()
    first = None
    for _ in tokens:
        first = first or time.perf_counter()
    return start, first, time.perf_counter()


def compare(label: str, ours_path: str, dtype: str, gguf: str, new: int, prompt_tokens: int, repeats: int,
            threads: int, ab_decode_stack: bool = False) -> tuple[str, dict[str, list[float]]]:
    """One pair, the tools alternating run by run -> (its table line, {tool: [prefill tok/s, decode tok/s]}).
    ab_decode_stack: ownllm also runs with its decode stack off (the Python layers, layers/decode_stack.py), a
    third tool in the turns, printed beside the line."""
    from llama_cpp import Llama

    from ownllm import LLM, SamplingParams

    ours = LLM(ours_path, **({"dtype": dtype} if dtype else {}), enable_prefix_caching=False)
    theirs = Llama(gguf, n_threads=threads, n_ctx=prompt_tokens + new + 64, n_batch=512, verbose=False)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)

    def run_ours(prompt):
        return timed(ours.stream_token_ids({"prompt_token_ids": prompt}, params))

    def run_theirs(prompt):
        def tokens():
            for i, _ in enumerate(theirs.generate(prompt, temp=0.0, reset=True)):
                yield
                if i + 1 >= new:
                    return
        theirs.reset()
        return timed(tokens())

    model = ours.runner.model
    stack = model.decode_stack

    def run_ours_layers(prompt):
        model.decode_stack = None
        try:
            return run_ours(prompt)
        finally:
            model.decode_stack = stack

    tools = [("ownllm", run_ours), ("llama.cpp", run_theirs)]
    if ab_decode_stack:
        tools.append(("ownllm, Python layers", run_ours_layers))
        print(f"{label}: decode stack {'on' if stack is not None else 'not applicable'}", flush=True)
    rng = random.Random(0)
    vocab = min(ours.config.vocab_size, theirs.n_vocab())
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in tools}
    for _ in range(repeats):
        for name, run in tools:
            prompt = [rng.randrange(100, vocab) for _ in range(prompt_tokens)]
            start, first, end = run(prompt)
            results[name].append((len(prompt) / (first - start), (new - 1) / (end - first)))
    med = {name: [statistics.median(r[i] for r in runs[1:]) for i in (0, 1)] for name, runs in results.items()}
    line = (f"| {label} | {med['ownllm'][1]:.1f} | {med['llama.cpp'][1]:.1f} | {med['ownllm'][1] / med['llama.cpp'][1]:.2f}x | "
            f"{med['ownllm'][0]:.0f} | {med['llama.cpp'][0]:.0f} |")
    print(line, "  runs:", {n: [round(r[1], 1) for r in runs] for n, runs in results.items()}, flush=True)
    del ours, theirs
    gc.collect()
    return line, med


TABLE_HEADER = ["| model | ownllm decode tok/s | llama.cpp decode tok/s | ownllm / llama.cpp | ownllm prefill tok/s | llama.cpp prefill tok/s |",
                "|---|---|---|---|---|---|"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length: the context decode starts from")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", help="comma-separated substrings of the pair labels to run, e.g. Q4_K_M")
    parser.add_argument("--ab-decode-stack", action="store_true",
                        help="also time ownllm with its decode stack off, alternating (printed only)")
    parser.add_argument("--table-only", type=Path, help="write just the table here (the harness's use), not RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    new = args.new_tokens
    lines = list(TABLE_HEADER)
    wanted = args.models.split(",") if args.models else [""]
    for pair in pairs(wanted):
        line, med = compare(*pair, new, args.prompt_tokens, args.repeats, args.threads, args.ab_decode_stack)
        lines.append(line)
        if args.ab_decode_stack:
            layers = med["ownllm, Python layers"][1]
            print(f"  decode stack off: {layers:.1f} tok/s = {layers / med['llama.cpp'][1]:.2f}x llama.cpp; "
                  f"on / off: {med['ownllm'][1] / layers:.2f}x", flush=True)
    if args.ab_decode_stack:
        return  # an A/B run: printed, RESULTS.md untouched
    if args.table_only:
        args.table_only.write_text("\n".join(lines[2:]) + "\n")  # the rows, without the header
        return
    body = (f"Command: `python bench/side_by_side.py --new-tokens {new} --prompt-tokens {args.prompt_tokens} --repeats {args.repeats} "
            f"--threads {args.threads}`; "
            f"{args.threads} threads each, the tools alternating run by run in one process (median of the runs after the "
            "first). The harness table above measures each tool in its own process, one after another.\n\n"
            + "\n".join(lines) + "\n")
    title = "Batch-1 decode, side by side" + (f", {args.prompt_tokens}-token prompts" if args.prompt_tokens != 128 else "")
    write_section(title, body)


if __name__ == "__main__":
    main()
