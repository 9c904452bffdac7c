"""The bf16 decode matmul kernel (kernels/gemv_bf16.cpp) on SmolLM2-135M's matrices, this tree's kernel against
the one of a git revision (default HEAD), taking turns in one process: GB/s of weights read.

    python bench/gemv_small.py [--against HEAD] [--threads 1,2] [--rows 1,2,4] [--repeats 9] [--shapes 135m]

Matrices (out x in): fused qkv 960x576, o_proj 576x576, fused gate_up 3072x576, down 1536 -> 576 (576x1536), and
the tied lm_head 49152x576; with --shapes 1b, Llama-3.2-1B's (bench/skinny_matmul.py's): 8192x2048, 2048x8192,
3072x2048. Each measurement cycles over enough copies of a matrix (>= 200 MB) that the weights
come from memory, as in a decode step (the 30 layers' 212 MB do not fit in L3). The baseline kernel is built from
the revision's kernels/ folder (cached by its sources' digest like any kernel). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ownllm.kernels.build import KERNEL_DIR, kernel_spec, load  # noqa: E402
from ownllm.kernels.cache import KernelSpec  # noqa: E402
from ownllm.layers.linear import gemv_kernel  # noqa: E402

SHAPES = {
    "135m": {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
             "lm_head": (49152, 576)},
    "1b": {"gate_up": (8192, 2048), "down": (2048, 8192), "qkv": (3072, 2048)},
}


def kernel_at(revision: str, folder: Path):
    """gemv_bf16 as built from `revision`'s kernel sources (copied into `folder`)."""
    relative = KERNEL_DIR.relative_to(ROOT)
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{revision}:{relative}"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith((".cpp", ".h")):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{relative}/{name}"],
                                  check=True, capture_output=True).stdout
            (folder / name).write_bytes(text)
    ours = kernel_spec("gemv_bf16")
    module = load(KernelSpec("gemv_bf16", folder / "gemv_bf16.cpp", ours.cflags, ours.ldflags))
    if module is None:
        sys.exit(f"the kernel at {revision} could not be built")
    return module


def seconds_per_call(fn, weights: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for w in weights:
        fn(w)
    return (time.perf_counter() - start) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="HEAD", help="git revision of the baseline kernel")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="135m")
    args = parser.parse_args()
    ours = gemv_kernel()
    if ours is None:
        sys.exit("the bf16 kernel cannot run on this CPU (it needs AVX-512 BF16)")
    with tempfile.TemporaryDirectory() as folder:
        base = kernel_at(args.against, Path(folder))
    print(f"| threads | rows | matrix | {args.against} GB/s | this tree GB/s | speed-up |\n|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, (out_features, in_features) in SHAPES[args.shapes].items():
            copies = max(4, int(200e6 / (2 * out_features * in_features)))
            weights = [torch.randn(out_features, in_features).bfloat16() for _ in range(copies)]
            for m in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(m, in_features).bfloat16()
                assert torch.equal(base.gemv_bf16(x, weights[0], None), ours.gemv_bf16(x, weights[0], None))
                tools = {"base": lambda w: base.gemv_bf16(x, w, None), "ours": lambda w: ours.gemv_bf16(x, w, None)}
                times: dict[str, list[float]] = {tool: [] for tool in tools}
                for _ in range(args.repeats + 1):  # the first pass warms up and is dropped
                    for tool, fn in tools.items():
                        times[tool].append(seconds_per_call(fn, weights))
                gb_s = {tool: 2 * out_features * in_features / statistics.median(t[1:]) / 1e9 for tool, t in times.items()}
                print(f"| {threads} | {m} | {name} {out_features}x{in_features} | {gb_s['base']:.1f} | {gb_s['ours']:.1f} "
                      f"| {gb_s['ours'] / gb_s['base']:.2f}x |", flush=True)
            del weights


if __name__ == "__main__":
    main()
