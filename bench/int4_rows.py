"""The 4-bit kernels at decode batch sizes: the bf16 one (kernels/int4_matmul.cpp: activations as they are, float
dot products) and the integer one (kernels/x16_vnni.cpp: activations quantized to 8 bits, VNNI dot products,
weights 16 rows interleaved), on the bundled SmolLM2-135M's Q4_1 matrices (fused as the model multiplies them:
qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536) and on a random 2048x2048.

    python bench/int4_rows.py [--threads 2] [--rows 1,2,4,8,16,32] [--repeats 7]

For each shape and row count the two kernels take turns call by call (each timed over enough calls to last
~20 ms), in one process; the fastest of the repeats is reported as ms per call and GFLOP/s (2 M N K / time):
on a shared machine the median mostly measures the other processes (with 2 threads, a descheduled thread holds
the other at the end of the call for a scheduler tick).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ownllm.kernels.build import bf16_kernels, vnni_kernels  # noqa: E402
from ownllm.layers.quant import Int4Weight, interleave_int4  # noqa: E402


def bundled_shapes() -> dict[str, Int4Weight]:
    """The first layer's Q4_1 matrices of the bundled model, fused as the model fuses them."""
    import gguf

    from ownllm.loader.resolve import bundled_model_path

    reader = gguf.GGUFReader(str(bundled_model_path()))
    tensors = {t.name: t for t in reader.tensors}

    def weight(name: str) -> Int4Weight:
        t = tensors[f"blk.0.{name}.weight"]
        cols, rows = (int(n) for n in t.shape)
        return Int4Weight.from_gguf_blocks(t.data, (rows, cols), has_min=True)

    return {"qkv": Int4Weight.cat([weight("attn_q"), weight("attn_k"), weight("attn_v")]),
            "o": weight("attn_output"), "gate_up": Int4Weight.cat([weight("ffn_gate"), weight("ffn_up")]),
            "down": weight("ffn_down")}


def random_weight(rows: int, cols: int) -> Int4Weight:
    groups = cols // 32
    return Int4Weight.from_codes(torch.randint(0, 16, (rows, cols), dtype=torch.uint8), torch.rand(rows, groups) / 8,
                                 torch.randn(rows, groups) / 4)


def seconds_per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old, new = bf16_kernels("int4_matmul"), vnni_kernels("x16_vnni")
    if old is None or new is None:
        sys.exit("needs AVX-512 BF16 and VNNI (both kernels)")
    weights = {**bundled_shapes(), "random 2048x2048": random_weight(2048, 2048)}
    print(f"threads {args.threads}; ms per call (GFLOP/s), fastest of {args.repeats}\n")
    print("| matrix | N x K | rows | int4_matmul (bf16) | x16_vnni (int8) | speedup |")
    print("|---|---|---:|---:|---:|---:|")
    for name, weight in weights.items():
        rows_, cols = weight.shape
        codes, scales = weight.codes.contiguous(), weight.scale.float().contiguous()
        mins = (weight.zero - 136 * weight.scale).float().contiguous()
        interleaved = interleave_int4(weight)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, cols).bfloat16()
            kernels = {"old": lambda: old.int4_matmul(x, codes, scales, mins, None),
                       "new": lambda: new.x16_matmul(x, interleaved, rows_, 2, None)}
            calls = {k: max(1, int(0.02 / seconds_per_call(fn, 3))) for k, fn in kernels.items()}
            times = {k: [] for k in kernels}
            for _ in range(args.repeats):
                for k, fn in kernels.items():
                    times[k].append(seconds_per_call(fn, calls[k]))
            med = {k: min(v) for k, v in times.items()}
            flops = 2 * rows * rows_ * cols
            cell = {k: f"{med[k] * 1e3:.3f} ({flops / med[k] / 1e9:.0f})" for k in med}
            print(f"| {name} | {rows_}x{cols} | {rows} | {cell['old']} | {cell['new']} | {med['old'] / med['new']:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
