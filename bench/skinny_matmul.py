"""The bf16 decode matmul kernel (kernels/gemv_bf16.cpp) and the GGUF block one (kernels/block_matmul.cpp, on
Q8_0, Q4_K and Q6_K blocks) against torch's oneDNN path on bf16 weights, by activation rows.

    python bench/skinny_matmul.py [--threads 2] [--rows 1,4,8,16,32,64,128]

Weights are the Llama-3.2-1B MLP's (8192x2048 and 2048x8192) and fused qkv (3072x2048), bfloat16, and
each measurement cycles over enough copies (>= 200 MB) that they come from memory, not L3, as in a real
decode step. Median of 7 passes; the kernels and oneDNN take turns. The block formats beyond 32 rows are
what a layer runs there: oneDNN on 1024 weight rows at a time, dequantized to bf16. Results go to bench/RESULTS.md
(section "Skinny bf16 matmul").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bundled_decode import write_section  # noqa: E402
from ownllm.layers.linear import gemv_kernel  # noqa: E402
from ownllm.layers.quant import BLOCK_FORMATS, BlockWeight  # noqa: E402
from tests.gguf_writer import random_quant_blocks  # noqa: E402

SHAPES = [(8192, 2048), (2048, 8192), (3072, 2048)]  # (out, in)
FORMATS = ("Q8_0", "Q4_K", "Q6_K")


def bytes_per_weight(name: str) -> float:
    if name not in FORMATS:
        return 2  # bf16
    weights, nbytes = BLOCK_FORMATS[GGMLQuantizationType[name]]
    return nbytes / weights


def random_blocks(qtype: str, out_features: int, in_features: int, rng: np.random.Generator) -> BlockWeight:
    """Random codes with small fp16 scales, laid out as GGUF's blocks of `qtype`."""
    kind = GGMLQuantizationType[qtype]
    return BlockWeight(torch.from_numpy(random_quant_blocks(kind, out_features, in_features, rng)), kind)


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
    rng = np.random.default_rng(0)
    lines = ["| weights (out x in) | rows | oneDNN bf16 ms | bf16 kernel | " + " | ".join(FORMATS) + " |",
             "|---|---|---|---|" + "---|" * len(FORMATS)]
    for out_features, in_features in SHAPES:
        def copies(name: str) -> int:
            return max(4, int(200_000_000 / (out_features * in_features * bytes_per_weight(name))))

        weights = {"onednn": [torch.randn(out_features, in_features).bfloat16() for _ in range(copies("bf16"))]}
        weights["kernel"] = weights["onednn"]
        for qtype in FORMATS:
            weights[qtype] = [random_blocks(qtype, out_features, in_features, rng) for _ in range(copies(qtype))]
        for m in rows:
            x = torch.randn(m, in_features).bfloat16()
            tools = {"onednn": lambda w: F.linear(x, w), "kernel": lambda w: kernel.gemv_bf16(x, w, None),
                     **{qtype: lambda w: w.matmul(x, None) for qtype in FORMATS}}
            if m > 64:
                del tools["kernel"]  # beyond the kernel's range
            times: dict[str, list[float]] = {name: [] for name in tools}
            for _ in range(8):  # the first pass warms up and is dropped
                for name, fn in tools.items():
                    times[name].append(per_call_ms(fn, weights[name]))
            med = {name: statistics.median(t[1:]) for name, t in times.items()}

            def cell(name: str) -> str:
                if name not in med:
                    return "(torch)"
                gb_s = out_features * in_features * bytes_per_weight(name) / med[name] / 1e6
                return f"{med[name]:.3f} ms, {med['onednn'] / med[name]:.2f}x, {gb_s:.0f} GB/s"

            cells = " | ".join(cell(name) for name in ("kernel", *FORMATS))
            line = f"| {out_features}x{in_features} | {m} | {med['onednn']:.3f} | {cells} |"
            print(line, flush=True)
            lines.append(line)
    body = (f"`python bench/skinny_matmul.py --threads {args.threads} --rows {args.rows}`, {args.threads} threads, "
            f"torch {torch.__version__}. Weights cycle through >= 200 MB of copies, so they come from memory. Each cell: "
            "ms per call, oneDNN's time over it (> 1x: faster than oneDNN on bf16 weights), and GB/s of the format's own "
            "bytes (bf16 2, Q8_0 1.06, Q4_K 0.56, Q6_K 0.82 per weight).\n\n"
            + "\n".join(lines) + "\n")
    write_section("Skinny bf16 matmul", body)


if __name__ == "__main__":
    main()
