"""The K-quant weights' two layouts for the integer kernel (kernels/kquant_vnni.cpp): the file's blocks and the
8-row interleaved ones built at load (layers/quant.py InterleavedBlocks), on the real Qwen2.5-Coder GGUFs.

    python bench/kquant_layouts.py [--threads 2] [--models Qwen2.5-Coder-1.5B,Qwen2.5-Coder-0.5B,bundled]
                                   [--repeats 5] [--new-tokens 64] [--prompt-tokens 128] [--skip-decode]

1. Matmuls: every 2-D weight of the 1.5B file (the token embedding aside: it is looked up, not multiplied) at one
   activation row, in file order (so they come from memory, as in a decode step), grouped by name and format;
   the two layouts take turns pass by pass, with torch's copy of a 512 MB buffer between passes (GB/s read).
   Median of the passes.
2. Decode and prefill: ownllm with the interleaved layout, ownllm with the file's blocks, and llama.cpp, the three
   alternating run by run in one process (bench/side_by_side.py's measurement: batch 1, greedy, random prompts).
"""

from __future__ import annotations

import argparse
import collections
import gc
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.side_by_side import pairs, timed  # noqa: E402
from ownllm.kernels.build import vnni_kernels  # noqa: E402
from ownllm.layers.quant import BLOCK_FORMATS  # noqa: E402

INTERLEAVED = (12, 14)  # Q4_K, Q6_K


def copy_bandwidth(src: torch.Tensor, dst: torch.Tensor) -> float:
    times = []
    for _ in range(4):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return src.numel() / statistics.median(times[1:]) / 1e9


def matmul_table(path: str, passes: int) -> list[str]:
    import gguf

    kernel = vnni_kernels()
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    matrices = []  # (group, qtype, file blocks, interleaved or None)
    for t in reader.tensors:
        if len(t.shape) != 2 or (t.name == "token_embd.weight" and "output.weight" in names):
            continue
        rows, qtype = int(t.shape[1]), int(t.tensor_type)
        blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(rows, -1))
        interleaved = kernel.x8_repack(blocks, qtype) if qtype in INTERLEAVED and rows % 8 == 0 else None
        group = (t.name.split(".", 2)[-1] if t.name.startswith("blk") else t.name, t.tensor_type.name)
        matrices.append((group, qtype, blocks, interleaved))
    src = torch.ones(512 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    xs: dict[int, torch.Tensor] = {}
    times = {layout: collections.defaultdict(list) for layout in ("file", "interleaved")}
    bandwidths = []
    for _ in range(passes):
        bandwidths.append(copy_bandwidth(src, dst))
        for layout, per_group in times.items():
            sums: dict = collections.defaultdict(float)
            for group, qtype, blocks, interleaved in matrices:
                weights, nbytes = BLOCK_FORMATS[qtype]
                x = xs.setdefault(blocks.shape[1] // nbytes * weights, torch.randn(1, blocks.shape[1] // nbytes * weights).bfloat16())
                start = time.perf_counter()
                if layout == "interleaved" and interleaved is not None:
                    kernel.x8_matmul(x, interleaved, qtype, None)
                else:
                    kernel.kquant_matmul(x, blocks, qtype, None)
                elapsed = time.perf_counter() - start
                sums[group] += elapsed
                sums[("all", "")] += elapsed
            for group, seconds in sums.items():
                per_group[group].append(seconds)
    sizes: dict = collections.defaultdict(int)
    counts: collections.Counter = collections.Counter()
    for group, _, blocks, _ in matrices:
        sizes[group] += blocks.numel()
        sizes[("all", "")] += blocks.numel()
        counts[group] += 1
    bandwidth = statistics.median(bandwidths)
    lines = [f"Copy bandwidth in the same run: {bandwidth:.1f} GB/s read (median of {passes}, between the passes); "
             f"{torch.get_num_threads()} threads; 1 activation row; {Path(path).name}.\n",
             "| matrices | count | MB (file) | file blocks ms | GB/s | interleaved ms | GB/s | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for group in sorted(times["file"], key=lambda g: -statistics.median(times["file"][g])):
        a, b = (statistics.median(times[layout][group]) * 1e3 for layout in ("file", "interleaved"))
        mb = sizes[group] / 1e6
        lines.append(f"| {' '.join(group).strip()} | {counts.get(group, '')} | {mb:.1f} | {a:.2f} | {mb / a:.1f} | "
                     f"{b:.2f} | {mb / b:.1f} | {a / b:.2f}x |")
    for line in lines:
        print(line, flush=True)
    return lines


def decode_table(args) -> list[str]:
    from llama_cpp import Llama

    import ownllm.layers.quant as quant
    from ownllm import LLM, SamplingParams

    lines = ["| model | interleaved decode tok/s | file blocks decode tok/s | llama.cpp decode tok/s | interleaved / llama.cpp | "
             "file / llama.cpp | interleaved prefill tok/s | file prefill tok/s | llama.cpp prefill tok/s | "
             "interleaved / llama.cpp prefill |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, ours_path, dtype, gguf_path in pairs(args.models.split(",")):
        kwargs = {"dtype": dtype} if dtype else {}
        takes = quant.InterleavedBlocks.takes
        quant.InterleavedBlocks.takes = staticmethod(lambda weight: False)
        try:  # one engine (two in one process share OpenMP teams): the file's blocks, with interleaved copies to swap in
            llm = LLM(ours_path, **kwargs, enable_prefix_caching=False)
        finally:
            quant.InterleavedBlocks.takes = takes
        linears = [m for m in llm.runner.model.modules() if isinstance(getattr(m, "packed", None), quant.BlockWeight)]
        layouts = {"file": [m.packed for m in linears],
                   "interleaved": [quant.InterleavedBlocks.repack(m.packed) if takes(m.packed) else m.packed for m in linears]}

        def use(layout: str) -> None:
            for module, weight in zip(linears, layouts[layout]):
                module.packed = weight
        theirs = Llama(gguf_path, n_threads=args.threads, n_ctx=args.prompt_tokens + args.new_tokens + 64, n_batch=512,
                       verbose=False)
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)

        def ours(layout):
            def run(prompt):
                use(layout)
                return timed(llm.stream_token_ids({"prompt_token_ids": prompt}, params))
            return run

        def run_theirs(prompt):
            def tokens():
                for i, _ in enumerate(theirs.generate(prompt, temp=0.0, reset=True)):
                    yield
                    if i + 1 >= args.new_tokens:
                        return
            theirs.reset()
            return timed(tokens())

        tools = {"interleaved": ours("interleaved"), "file": ours("file"), "llama.cpp": run_theirs}
        rng = random.Random(0)
        vocab = min(llm.config.vocab_size, theirs.n_vocab())
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in tools}
        for _ in range(args.repeats):
            for name, run in tools.items():
                prompt = [rng.randrange(100, vocab) for _ in range(args.prompt_tokens)]
                start, first, end = run(prompt)
                results[name].append((len(prompt) / (first - start), (args.new_tokens - 1) / (end - first)))
        med = {name: [statistics.median(r[i] for r in runs[1:]) for i in (0, 1)] for name, runs in results.items()}
        line = (f"| {label} | {med['interleaved'][1]:.1f} | {med['file'][1]:.1f} | {med['llama.cpp'][1]:.1f} | "
                f"{med['interleaved'][1] / med['llama.cpp'][1]:.2f}x | {med['file'][1] / med['llama.cpp'][1]:.2f}x | "
                f"{med['interleaved'][0]:.0f} | {med['file'][0]:.0f} | {med['llama.cpp'][0]:.0f} | "
                f"{med['interleaved'][0] / med['llama.cpp'][0]:.2f}x |")
        print(line, "  decode runs:", {n: [round(r[1], 1) for r in runs] for n, runs in results.items()}, flush=True)
        lines.append(line)
        del llm, layouts, linears, theirs
        gc.collect()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="Qwen2.5-Coder-1.5B,Qwen2.5-Coder-0.5B,bundled")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-matmuls", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if vnni_kernels() is None:
        sys.exit("the integer kernels cannot run on this CPU (they need AVX-512 BF16 and VNNI)")
    if not args.skip_matmuls:
        from bench.fetch_models import fetch

        matmul_table(str(fetch("1.5b")), args.passes)
    if not args.skip_decode:
        for line in decode_table(args):
            print(line)


if __name__ == "__main__":
    main()
