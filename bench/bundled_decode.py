"""Decode speed on the bundled SmolLM2-135M-Instruct Q4_1 GGUF: ownllm next to llama.cpp, same file, same run.

    python bench/bundled_decode.py [--new-tokens 128] [--repeats 3] [--threads 2]

Each tool: one warm-up, then `repeats` greedy runs of the same chat prompt ignoring EOS; the median
prefill and decode tokens/s are reported, with ownllm's ratio to llama.cpp, and written to
bench/RESULTS.md (section "Bundled model decode").
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
QUESTION = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def time_ownllm(prompt_ids: list[int], new_tokens: int, repeats: int, dtype: str | None) -> tuple[float, float]:
    from ownllm import LLM, SamplingParams

    llm = LLM(dtype=dtype)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    runs = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        stream = llm.stream_token_ids({"prompt_token_ids": prompt_ids}, params)
        next(stream)
        first = time.perf_counter()
        for _ in stream:
            pass
        end = time.perf_counter()
        assert len(llm.last_output.token_ids) == new_tokens
        runs.append((len(prompt_ids) / (first - start), (new_tokens - 1) / (end - first)))
    return _median(runs[1:])


def time_llama_cpp(model_path: Path, prompt_ids: list[int], new_tokens: int, repeats: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    runs = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        first, count = None, 0
        for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            count += 1
            first = first or time.perf_counter()
            if count == new_tokens:
                break
        end = time.perf_counter()
        runs.append((len(prompt_ids) / (first - start), (new_tokens - 1) / (end - first)))
    return _median(runs[1:])


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def write_section(title: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    header = f"## {title}\n"
    if header in text:
        before, _, rest = text.partition(header)
        after = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        text = before + header + body + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + header + body
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import llama_cpp

    from ownllm.loader.resolve import bundled_model_path
    from ownllm.loader.gguf import load_gguf

    path = bundled_model_path()
    tokenizer = load_gguf(path, keep_quantized=True).tokenizer
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    theirs = time_llama_cpp(path, prompt_ids, args.new_tokens, args.repeats, args.threads)
    fast = time_ownllm(prompt_ids, args.new_tokens, args.repeats, None)
    exact = time_ownllm(prompt_ids, args.new_tokens, args.repeats, "float32")
    theirs_again = time_llama_cpp(path, prompt_ids, args.new_tokens, args.repeats, args.threads)
    theirs = tuple(max(a, b) for a, b in zip(theirs, theirs_again))  # llama.cpp's better run of two
    rows = [("ownllm default (bf16, 4-bit and Q8_0 kernels)", fast), ("ownllm --dtype float32 (exact)", exact),
            (f"llama.cpp {llama_cpp.__version__} (Q4_1 kernels), best of 2 runs", theirs)]
    table = ["| tool | prefill tokens/s | decode tokens/s | decode vs llama.cpp |", "|---|---|---|---|"]
    for name, (prefill, decode) in rows:
        table.append(f"| {name} | {prefill:.1f} | {decode:.1f} | {decode / theirs[1]:.2f}x |")
    body = "\n".join([
        f"Command: `python bench/bundled_decode.py --new-tokens {args.new_tokens} --repeats {args.repeats} "
        f"--threads {args.threads}`",
        f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
        f"prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, greedy, EOS ignored, median of {args.repeats}.",
        "", *table, "",
    ])
    print(body)
    write_section("Bundled model decode (SmolLM2-135M-Instruct Q4_1)", body)


if __name__ == "__main__":
    main()
