"""The integer block kernel (kernels/kquant_vnni.cpp) against the float one (kernels/block_matmul.cpp) and the
machine's memory bandwidth, then batch-1 decode of the real Qwen2.5-Coder GGUFs and the bundled model against
llama.cpp.

    python bench/kquant_decode.py [--threads 2] [--rows 1,4,16,32] [--new-tokens 64] [--repeats 5] [--skip-decode]

1. Bandwidth: torch's copy of a 512 MB buffer (median of 5): GB/s read (bytes / time; it writes as much too).
2. Kernels: for each format (Q4_K, Q6_K, Q8_0, Q5_0) and activation rows, the Qwen2.5-Coder-1.5B MLP's two
   matrices (8960x1536 and 1536x8960) of random blocks, cycling over >= 200 MB of copies so they come from
   memory; median of 7 passes after one warm-up, the two kernels taking turns. GB/s: the format's bytes per call
   over its time, next to the bandwidth measured in the same run.
3. Decode: bench/side_by_side.py's pairs for the two Qwen GGUFs (fetched when missing) and the bundled model,
   the tools alternating run by run in one process. llama.cpp's weight GB/s: its tokens/s times the bytes of the
   file's matrices that a token reads (every 2-D tensor but the token embedding, unless it is also the output).
Results go to bench/RESULTS.md (section "Integer K-quant kernels").
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

from bench.bundled_decode import write_section  # noqa: E402
from bench.skinny_matmul import bytes_per_weight, per_call_ms, random_blocks  # noqa: E402
from ownllm.kernels.build import bf16_kernels, vnni_kernels  # noqa: E402

FORMATS = ("Q4_K", "Q6_K", "Q8_0", "Q5_0")
SHAPES = [(8960, 1536), (1536, 8960)]  # Qwen2.5-Coder-1.5B's MLP (out, in)
DECODE_MODELS = "Qwen2.5-Coder-1.5B,Qwen2.5-Coder-0.5B,bundled"


def copy_bandwidth(megabytes: int = 512) -> float:
    """GB/s that torch's copy reads (it writes as much again)."""
    src = torch.ones(megabytes << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return src.numel() / statistics.median(times[1:]) / 1e9


def kernel_table(rows: list[int]) -> list[str]:
    integer, floating = vnni_kernels(), bf16_kernels("block_matmul")
    if integer is None or floating is None:
        sys.exit("the kernels cannot run on this CPU (they need AVX-512 BF16 and VNNI)")
    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth:.1f} GB/s read", flush=True)
    lines = [f"Copy bandwidth measured in this run: {bandwidth:.1f} GB/s read.\n",
             "| format | rows | integer (kquant_vnni) ms | GB/s | of copy bandwidth | float (block_matmul) ms | GB/s | integer speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for qtype in FORMATS:
        matrix_bytes = sum(n * k for n, k in SHAPES) * bytes_per_weight(qtype)
        copies = max(4, int(200e6 / matrix_bytes))
        weights = [[random_blocks(qtype, n, k, rng) for n, k in SHAPES] for _ in range(copies)]
        for m in rows:
            xs = {k: torch.randn(m, k).bfloat16() for _, k in SHAPES}
            tools = {"integer": lambda ws: [integer.kquant_matmul(xs[w.shape[1]], w.blocks, int(w.qtype), None) for w in ws],
                     "float": lambda ws: [floating.block_matmul(xs[w.shape[1]], w.blocks, int(w.qtype), None) for w in ws]}
            times: dict[str, list[float]] = {name: [] for name in tools}
            for _ in range(8):  # the first pass warms up and is dropped
                for name, fn in tools.items():
                    times[name].append(per_call_ms(fn, weights))
            ms = {name: statistics.median(t[1:]) for name, t in times.items()}
            gb_s = {name: matrix_bytes / t / 1e6 for name, t in ms.items()}
            line = (f"| {qtype} | {m} | {ms['integer']:.3f} | {gb_s['integer']:.1f} | {gb_s['integer'] / bandwidth:.0%} | "
                    f"{ms['float']:.3f} | {gb_s['float']:.1f} | {ms['float'] / ms['integer']:.2f}x |")
            print(line, flush=True)
            lines.append(line)
    return lines


def weight_bytes_per_token(path: str) -> int:
    """Bytes of the matrices a decode step reads from a GGUF: its 2-D tensors, less the token embedding (looked
    up a row at a time) unless the model has no separate output matrix."""
    import gguf

    tensors = [t for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2]
    names = {t.name for t in tensors}
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or "output.weight" not in names)


def decode_table(args) -> list[str]:
    from bench.side_by_side import TABLE_HEADER, compare, pairs

    lines = [TABLE_HEADER[0] + " ownllm weight GB/s | llama.cpp weight GB/s |", TABLE_HEADER[1] + "---|---|"]
    for pair in pairs(DECODE_MODELS.split(",")):
        line, med = compare(*pair, args.new_tokens, args.prompt_tokens, args.repeats, args.threads)
        per_token = weight_bytes_per_token(pair[3]) / 1e9
        lines.append(line + f" {med['ownllm'][1] * per_token:.1f} | {med['llama.cpp'][1] * per_token:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,4,16,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-decode", action="store_true", help="only the bandwidth and kernel tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = kernel_table([int(r) for r in args.rows.split(",")])
    command = f"python bench/kquant_decode.py --threads {args.threads} --rows {args.rows}"
    if not args.skip_decode:
        lines += ["", *decode_table(args)]
        command += f" --new-tokens {args.new_tokens} --prompt-tokens {args.prompt_tokens} --repeats {args.repeats}"
    else:
        command += " --skip-decode"
    body = (f"Command: `{command}`; {args.threads} threads, torch {torch.__version__}. Kernel rows: the 1.5B's MLP "
            "matrices of random blocks, from memory; decode rows: batch 1, greedy, the tools alternating in one "
            "process.\n\n" + "\n".join(lines) + "\n")
    write_section("Integer K-quant kernels", body)


if __name__ == "__main__":
    main()
