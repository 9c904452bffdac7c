"""The 8-row interleaved K-quant layouts (layers/quant.py InterleavedBlocks) at many activation rows: the tiled
integer GEMM (kernels/kquant_vnni.cpp x8_gemm) against the paths it may replace, x8_matmul (the rows kernel, up to
32 rows) and the float path (x8_dequantize to bf16, then oneDNN), on Qwen2.5-Coder-1.5B's matrix shapes.

    python bench/kquant_gemm.py [--threads 2] [--rows 1,4,8,16,32,128,512] [--formats Q4_K,Q6_K] [--passes 7]

Random blocks; each shape's weights are one copy (they stay in cache between calls where they fit, as a
prefill's weights do across its chunk's rows). The paths take turns call by call in one process; median of the
passes after one warm-up. GOP/s: 2 M N K over the time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.skinny_matmul import random_blocks  # noqa: E402
from ownllm.kernels.build import vnni_kernels  # noqa: E402
from ownllm.layers.quant import InterleavedBlocks  # noqa: E402

SHAPES = {"q/o 1536x1536": (1536, 1536), "k/v 256x1536": (256, 1536), "gate/up 8960x1536": (8960, 1536),
          "down 1536x8960": (1536, 8960)}  # (out, in)


def timed_ms(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,4,8,16,32,128,512")
    parser.add_argument("--formats", default="Q4_K,Q6_K")
    parser.add_argument("--passes", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = vnni_kernels()
    if kernel is None:
        sys.exit("the integer kernels cannot run on this CPU (they need AVX-512 BF16 and VNNI)")
    rng = np.random.default_rng(0)
    print("| format | matrix | rows | x8_gemm ms | GOP/s | x8_matmul ms | GOP/s | float ms | GOP/s | gemm speed-up over the faster |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for qtype in args.formats.split(","):
        for name, (n, k) in SHAPES.items():
            weight = InterleavedBlocks.repack(random_blocks(qtype, n, k, rng))
            for m in map(int, args.rows.split(",")):
                x = torch.randn(m, k).bfloat16()
                tools = {"gemm": lambda: kernel.x8_gemm(x, weight.blocks, int(weight.qtype), None),
                         "float": lambda: weight.float_matmul(x, None)}
                if m <= 32:
                    tools["rows"] = lambda: kernel.x8_matmul(x, weight.blocks, int(weight.qtype), None)
                calls = max(1, int(2e9 / (2 * m * n * k)))
                times: dict[str, list[float]] = {tool: [] for tool in tools}
                for _ in range(args.passes + 1):
                    for tool, fn in tools.items():
                        times[tool].append(timed_ms(fn, calls))
                ms = {tool: statistics.median(t[1:]) for tool, t in times.items()}
                gops = {tool: 2 * m * n * k / t / 1e6 for tool, t in ms.items()}
                rows = f"{ms['rows']:.3f} | {gops['rows']:.0f}" if "rows" in ms else "- | -"
                best = min(t for tool, t in ms.items() if tool != "gemm")
                print(f"| {qtype} | {name} | {m} | {ms['gemm']:.3f} | {gops['gemm']:.0f} | {rows} | {ms['float']:.3f} | "
                      f"{gops['float']:.0f} | {best / ms['gemm']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
