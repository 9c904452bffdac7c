"""Compiles the C++ kernels next to this file with torch's extension builder, once, into a cache folder.

A kernel that cannot be built (no compiler, a CPU without the instructions) is reported once and
its callers fall back to plain torch. OWNLLM_NO_KERNELS=1 turns them all off. Every kernel function
releases the GIL while it runs (py::call_guard<py::gil_scoped_release>: they touch no Python object), so
the server's thread runs its Python meanwhile instead of waiting out the engine's kernel calls.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
CACHE_DIR = Path(os.environ.get("OWNLLM_CACHE", Path.home() / ".cache" / "ownllm")) / "kernels"
# at::parallel_for is a header template: built without OpenMP it runs on one thread. libgomp's soname
# matches the copy torch loads, so the kernels share torch's thread pool.
OPENMP_FLAGS = ("-fopenmp",)
BF16_FLAGS = ("-mavx512f", "-mavx512bf16", "-mavx512vl", "-mavx512bw", "-mf16c")
BF16_CPU_FLAGS = ("avx512_bf16", "avx512bw")  # /proc/cpuinfo names of what BF16_FLAGS compiles for
# block_matmul decodes GGUF blocks with float32 arithmetic that must round as gguf-py's dequantize rounds
KERNEL_FLAGS = {"block_matmul": ("-ffp-contract=off",)}
# the skinny bf16 matmul kernels (gemv_bf16, block_matmul) take batches of up to this many rows; larger ones
# go to oneDNN. Up to 64 they are right, but slower than oneDNN on K = 8192 (bench/skinny_matmul.py)
GEMV_MAX_ROWS = 32


@functools.cache
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def load(name: str, required_flags: tuple[str, ...], extra_cflags: tuple[str, ...]):
    """The compiled module `name` (from name.cpp), or None when it cannot run here."""
    if os.environ.get("OWNLLM_NO_KERNELS") == "1":
        return None
    missing = [f for f in required_flags if f not in cpu_flags()]
    if missing:
        logger.info("kernel %s disabled: the CPU lacks %s", name, ", ".join(missing))
        return None
    from torch.utils.cpp_extension import load as build

    source = Path(__file__).with_name(f"{name}.cpp")
    cflags = ["-O3", *OPENMP_FLAGS, *extra_cflags]
    # one build per source text and flags: checkouts or versions sharing the cache never load another's module
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(cflags).encode()).hexdigest()[:12]
    build_dir = CACHE_DIR / f"{name}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return build(name=f"ownllm_{name}_{digest}", sources=[str(source)], extra_cflags=cflags,
                     extra_ldflags=list(OPENMP_FLAGS), build_directory=str(build_dir), verbose=False)
    except Exception as error:  # no compiler, or it failed: run on plain torch instead
        logger.warning("kernel %s could not be built, using plain torch: %s", name, error)
        return None


def cpu_has_bf16() -> bool:
    """Whether this CPU runs the AVX-512 BF16 kernels (tests skip without it, and fail if they do not build)."""
    return set(BF16_CPU_FLAGS) <= cpu_flags()


@functools.cache
def bf16_kernels(name: str):
    """A module of AVX-512 BF16 kernels (gemv_bf16, decode_ops, moe_experts...), or None on CPUs without those instructions."""
    logger.info("building the %s kernels (once; cached afterwards)", name)
    return load(name, BF16_CPU_FLAGS, BF16_FLAGS + KERNEL_FLAGS.get(name, ()))


def on_bf16_cpu(x: torch.Tensor) -> bool:
    """Whether the bf16 kernels can take tensor `x`: bfloat16, on the CPU (they are CPU code)."""
    return x.dtype == torch.bfloat16 and x.is_cpu


def bf16_kernels_for(name: str, x: torch.Tensor):
    """bf16_kernels(name) when they can take `x`, else None."""
    return bf16_kernels(name) if on_bf16_cpu(x) else None


def decode_ops(x: torch.Tensor):
    """The fused decode ops (kernels/decode_ops.cpp) for `x`, or None."""
    return bf16_kernels_for("decode_ops", x)


def prefill_attention_kernel(x: torch.Tensor):
    """The bf16 attention of many queries (kernels/prefill_attention.cpp) for `x`, or None."""
    return bf16_kernels_for("prefill_attention", x)
