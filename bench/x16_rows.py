"""The 16-row integer kernel (kernels/x16_vnni.cpp: activations quantized to 8 bits, VNNI dot products, weights 16
rows interleaved) against the kernels it replaces, at decode batch sizes: for Q4_1, the bf16 kernel
(kernels/int4_matmul.cpp: activations as they are, float dot products) on the bundled SmolLM2-135M's matrices (fused
as the model multiplies them: qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536) and on a random 2048x2048;
for Q8_0, kernels/kquant_vnni.cpp on the file's blocks (the same 8-bit activations) on the bundled model's lm_head
(its token embedding, 49152x576) and a random 2048x2048.

    python bench/x16_rows.py [--threads 2] [--rows 1,2,4,8,16,32] [--repeats 7]

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
from ownllm.layers.quant import BlockWeight, Int4Weight, X16Blocks, interleave_int4  # noqa: E402


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


def bundled_lm_head() -> BlockWeight:
    import gguf

    from ownllm.loader.resolve import bundled_model_path

    t = next(t for t in gguf.GGUFReader(str(bundled_model_path())).tensors if t.name == "token_embd.weight")
    cols, rows = (int(n) for n in t.shape)
    return BlockWeight.from_gguf_blocks(t.data, (rows, cols), int(t.tensor_type))


def random_q8_0(rows: int, cols: int) -> BlockWeight:
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType.Q8_0
    return BlockWeight.from_gguf_blocks(gguf.quants.quantize(np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32),
                                                             kind), (rows, cols), kind)


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
    file_layout = vnni_kernels()
    cases = {}  # name -> (N, K, {kernel: multiply(x)})
    for name, weight in {**bundled_shapes(), "random 2048x2048": random_weight(2048, 2048)}.items():
        codes, scales = weight.codes.contiguous(), weight.scale.float().contiguous()
        mins = (weight.zero - 136 * weight.scale).float().contiguous()
        interleaved, rows_ = interleave_int4(weight), weight.shape[0]
        cases[f"Q4_1 {name}"] = (*weight.shape, {
            "old": lambda x, c=codes, s=scales, m=mins: old.int4_matmul(x, c, s, m, None),
            "new": lambda x, i=interleaved, n=rows_: new.x16_matmul(x, i, n, 2, None)})
    for name, weight in {"lm_head": bundled_lm_head(), "random 2048x2048": random_q8_0(2048, 2048)}.items():
        x16 = X16Blocks.repack(weight)
        cases[f"Q8_0 {name}"] = (*weight.shape, {
            "old": lambda x, w=weight: file_layout.kquant_matmul(x, w.blocks, 8, None),
            "new": lambda x, w=x16: new.x16_matmul(x, w.blocks, w.rows, 8, None)})
    print(f"threads {args.threads}; ms per call (GFLOP/s), fastest of {args.repeats}\n")
    print("| matrix | N x K | rows | before (Q4_1: int4_matmul bf16; Q8_0: kquant_vnni file blocks) | x16_vnni | speedup |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (rows_, cols, kernels) in cases.items():
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, cols).bfloat16()
            calls = {k: max(1, int(0.02 / seconds_per_call(lambda: fn(x), 3))) for k, fn in kernels.items()}
            times = {k: [] for k in kernels}
            for _ in range(args.repeats):
                for k, fn in kernels.items():
                    times[k].append(seconds_per_call(lambda: fn(x), calls[k]))
            best = {k: min(v) for k, v in times.items()}
            flops = 2 * rows * rows_ * cols
            cell = {k: f"{best[k] * 1e3:.3f} ({flops / best[k] / 1e9:.0f})" for k in best}
            print(f"| {name} | {rows_}x{cols} | {rows} | {cell['old']} | {cell['new']} | {best['old'] / best['new']:.2f}x |",
                  flush=True)

if __name__ == "__main__":
    main()
