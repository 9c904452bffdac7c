"""The bf16 decode matmul kernel (kernels/gemv_bf16.cpp) and the Q8_0 one (kernels/q8_matmul.cpp, GGUF blocks)
against torch's oneDNN path on bf16 weights, by activation rows.

    python bench/skinny_matmul.py [--threads 2] [--rows 1,4,8,16,32,64,128]

Weights are the Llama-3.2-1B MLP's (8192x2048 and 2048x8192) and fused qkv (3072x2048), bfloat16, and
each measurement cycles over enough copies (>= 200 MB) that they come from memory, not L3, as in a real
decode step. Median of 7 passes; the kernels and oneDNN take turns. Q8_0 beyond 32 rows is what a layer
runs there: oneDNN on 1024 weight rows at a time, dequantized to bf16. Results go to bench/RESULTS.md
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
from ownllm.layers.quant import Q8_BLOCK_BYTES, Q8Weight  # noqa: E402

SHAPES = [(8192, 2048), (2048, 8192), (3072, 2048)]  # (out, in)


def random_q8(out_features: int, in_features: int) -> Q8Weight:
    """Random codes with small fp16 scales, as GGUF lays out Q8_0 blocks."""
    blocks = torch.randint(-128, 128, (out_features, in_features // 32, Q8_BLOCK_BYTES), dtype=torch.int8).view(torch.uint8)
    blocks[..., :2] = (torch.rand(out_features, in_features // 32, 1) / 64).half().view(torch.uint8)
    return Q8Weight(blocks.reshape(out_features, -1))


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
    lines = ["| weights (out x in) | rows | bf16 kernel ms | Q8_0 kernel ms | oneDNN ms | bf16 kernel GB/s | Q8_0 GB/s "
             "| oneDNN / bf16 kernel | oneDNN / Q8_0 |", "|---|---|---|---|---|---|---|---|---|"]
    for out_features, in_features in SHAPES:
        weights = [torch.randn(out_features, in_features).bfloat16()
                   for _ in range(max(4, 200_000_000 // (out_features * in_features * 2)))]
        q8_weights = [random_q8(out_features, in_features) for _ in range(max(4, 200_000_000 // (out_features * in_features)))]
        for m in rows:
            x = torch.randn(m, in_features).bfloat16()
            tools = {"kernel": lambda w: kernel.gemv_bf16(x, w, None), "onednn": lambda w: F.linear(x, w),
                     "q8": lambda w: w.matmul(x, None)}
            if m > 64:
                tools["kernel"] = None  # beyond the kernel's range
            times: dict[str, list[float]] = {name: [] for name, fn in tools.items() if fn}
            for _ in range(8):  # the first pass warms up and is dropped
                for name in times:
                    times[name].append(per_call_ms(tools[name], q8_weights if name == "q8" else weights))
            med = {name: statistics.median(t[1:]) for name, t in times.items()}
            gigabytes = out_features * in_features * 2 / 1e9
            kernel_ms, q8_ms = med.get("kernel"), med["q8"]
            bf16_cells = ((f"{kernel_ms:.3f}", f"{gigabytes / kernel_ms * 1e3:.0f}", f"{med['onednn'] / kernel_ms:.2f}x")
                          if kernel_ms else ("(torch)", "", ""))
            line = (f"| {out_features}x{in_features} | {m} | {bf16_cells[0]} | {q8_ms:.3f} | {med['onednn']:.3f} | "
                    f"{bf16_cells[1]} | {gigabytes * Q8_BLOCK_BYTES / 64 / q8_ms * 1e3:.0f} | {bf16_cells[2]} | "
                    f"{med['onednn'] / q8_ms:.2f}x |")
            print(line, flush=True)
            lines.append(line)
    body = (f"`python bench/skinny_matmul.py --threads {args.threads} --rows {args.rows}`, {args.threads} threads, "
            f"torch {torch.__version__}. Weights cycle through >= 200 MB of copies, so they come from memory; GB/s counts each format's bytes (bf16 2, Q8_0 1.06 per weight).\n\n"
            + "\n".join(lines) + "\n")
    write_section("Skinny bf16 matmul", body)


if __name__ == "__main__":
    main()
