"""The bf16 decode matmul kernel (kernels/gemv_bf16.cpp) against torch's oneDNN path, by activation rows.

    python bench/skinny_matmul.py [--threads 2] [--rows 1,4,8,16,32,64,128]

Weights are the Llama-3.2-1B MLP's (8192x2048 and 2048x8192) and fused qkv (3072x2048), bfloat16, and
each measurement cycles over enough copies (>= 200 MB) that they come from memory, not L3, as in a real
decode step. Median of 7 passes; the kernel and oneDNN take turns. Results go to bench/RESULTS.md
(section "Skinny bf16 matmul").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402
from ownllm.layers.linear import gemv_kernel  # noqa: E402

SHAPES = [(8192, 2048), (2048, 8192), (3072, 2048)]  # (out, in)


def per_call_ms(fn, weights: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for w in weights:
        fn(w)
    return (time.perf_counter() - start) / len(weights) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,4,8,16,32,64,128")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = gemv_kernel()
    if kernel is None:
        sys.exit("the bf16 kernel cannot run on this CPU (it needs AVX-512 BF16)")
    rows = [int(r) for r in args.rows.split(",")]
    lines = ["| weights (out x in) | rows | kernel ms | oneDNN ms | kernel GB/s | oneDNN / kernel |", "|---|---|---|---|---|---|"]
    for out_features, in_features in SHAPES:
        weights = [torch.randn(out_features, in_features).bfloat16()
                   for _ in range(max(4, 200_000_000 // (out_features * in_features * 2)))]
        for m in rows:
            x = torch.randn(m, in_features).bfloat16()
            tools = {"kernel": lambda w: kernel.gemv_bf16(x, w, None), "onednn": lambda w: F.linear(x, w)}
            if m > 64:
                tools["kernel"] = None  # beyond the kernel's range
            times: dict[str, list[float]] = {name: [] for name, fn in tools.items() if fn}
            for _ in range(8):  # the first pass warms up and is dropped
                for name in times:
                    times[name].append(per_call_ms(tools[name], weights))
            med = {name: statistics.median(t[1:]) for name, t in times.items()}
            gigabytes = out_features * in_features * 2 / 1e9
            kernel_ms = med.get("kernel")
            line = (f"| {out_features}x{in_features} | {m} | {kernel_ms:.3f} | {med['onednn']:.3f} | "
                    f"{gigabytes / kernel_ms * 1e3:.0f} | {med['onednn'] / kernel_ms:.2f}x |" if kernel_ms else
                    f"| {out_features}x{in_features} | {m} | (torch) | {med['onednn']:.3f} | | |")
            print(line, flush=True)
            lines.append(line)
    body = (f"`python bench/skinny_matmul.py --threads {args.threads} --rows {args.rows}`, {args.threads} threads, "
            f"torch {torch.__version__}. Weights cycle through >= 200 MB of copies, so they come from memory.\n\n"
            + "\n".join(lines) + "\n")
    write_section("Skinny bf16 matmul", body)


if __name__ == "__main__":
    main()
