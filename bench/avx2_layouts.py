"""What the AVX2 kernel's layouts (layers/quant_avx2.py, kernels/x16_avx2.cpp) read at batch-1 decode, on CPUs
without AVX-512, for the real GGUF files (fetched when missing, as bench/fetch_models.py does):

    python bench/avx2_layouts.py [--models bundled,0.5B,1.5B] [--tokens 32] [--threads 2]

1. Bytes a token reads: the repacked weights of every matrix, summed from the loaded model, against the file's
   matrices a token reads (every 2-D tensor but the token embedding, unless it is also the output): what llama.cpp
   reads.
2. Each matmul shape's time per call at decode (x16_matmul_avx2 timed around each call over a greedy run of
   --tokens after a 128-token prompt, after one warm-up run) and the GB/s that makes; then the decode wall time a
   token and the share spent in these matmuls.
Comparisons with llama.cpp's decode rate: bench/side_by_side.py.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fetch_models import fetch  # noqa: E402
from ownllm import LLM, SamplingParams  # noqa: E402
from ownllm.layers import quant_avx2  # noqa: E402
from ownllm.model_list import bundled_model_path  # noqa: E402

MODELS = {"bundled": lambda: bundled_model_path(), "0.5B": lambda: fetch("0.5b"), "1.5B": lambda: fetch("1.5b")}


def file_bytes_per_token(path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    return sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2
               and (t.name != "token_embd.weight" or "output.weight" not in names))


def measure(label: str, tokens: int) -> None:
    path = MODELS[label]()
    llm = LLM(str(path), enable_prefix_caching=False)
    packed = [m.packed for m in llm.runner.model.modules() if isinstance(getattr(m, "packed", None), quant_avx2.X16Weight)]
    if not packed:
        raise SystemExit("the AVX2 kernel does not run here (a CPU with AVX-512 BF16, or without AVX2): nothing to measure")
    ours = sum(w.blocks.numel() for w in packed)
    print(f"\n{label}: {ours / 1e6:.1f} MB a token in the AVX2 layouts, the file's {file_bytes_per_token(path) / 1e6:.1f} MB")

    calls: dict[tuple, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0])
    multiply = quant_avx2.X16Weight.matmul

    def timed(self, x, bias):
        start = time.perf_counter()
        out = multiply(self, x, bias)
        if x.shape[0] == 1:
            entry = calls[(self.layout, tuple(self.shape))]
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            entry[2] = self.blocks.numel()
        return out

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(100, 228))}
    quant_avx2.X16Weight.matmul = timed
    try:
        for _ in range(2):  # a warm-up, then the one that counts
            calls.clear()
            for _ in llm.stream_token_ids(prompt, params):
                pass
    finally:
        quant_avx2.X16Weight.matmul = multiply
    names = {v: k for k, v in vars(quant_avx2).items() if k.endswith("_LAYOUT")}
    print("| layout | shape | calls | ms / call | GB/s |\n|---|---|---|---|---|")
    for (layout, shape), (n, seconds, nbytes) in sorted(calls.items(), key=lambda kv: -kv[1][1]):
        print(f"| {names[layout]} | {shape[0]}x{shape[1]} | {n} | {seconds / n * 1e3:.3f} | {nbytes * n / seconds / 1e9:.1f} |")
    in_matmuls = sum(seconds for _, seconds, _ in calls.values()) / (tokens - 1)
    first = last = None
    count = 0
    for _ in llm.stream_token_ids(prompt, params):
        count += 1
        last = time.perf_counter()
        first = first or last
    wall = (last - first) / (count - 1)
    print(f"decode: {wall * 1e3:.1f} ms a token, {in_matmuls * 1e3:.1f} ms of it in these matmuls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bundled,0.5B,1.5B")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for label in args.models.split(","):
        measure(label, args.tokens)


if __name__ == "__main__":
    main()
