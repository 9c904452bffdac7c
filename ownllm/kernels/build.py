"""Which C++ kernels this machine can run, and each one's compiled module: built once per torch version into the
cache (cache.py, compile.py), then loaded from it by name.

The kernels in this folder are AVX-512 BF16 code, but for those of AVX2_KERNELS (CPUs with AVX2 and FMA alone,
float32 activations). The first time any of them is needed and the cache lacks it, every kernel of its
instruction set that the cache lacks is built, in parallel, so a model's first answer waits for one round of builds
rather than one build per kernel. A kernel that cannot be built (no compiler, a compiler error) is reported in
one line and its callers fall back to plain torch; so do CPUs without the instructions. OWNLLM_NO_KERNELS=1 turns
them all off. Every kernel function releases the GIL while it runs (py::call_guard<py::gil_scoped_release>: they
touch no Python object), so the server's thread runs its Python meanwhile instead of waiting out the engine's
kernel calls.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

from ownllm.kernels import cache, progress
from ownllm.kernels.compile import build_missing
from ownllm.kernels.cache import KernelSpec

logger = logging.getLogger(__name__)
KERNEL_DIR = Path(__file__).parent
# at::parallel_for is a header template: built without OpenMP it runs on one thread. libgomp's soname
# matches the copy torch loads, so the kernels share torch's thread pool.
OPENMP_FLAGS = ("-fopenmp",)
BF16_FLAGS = ("-mavx512f", "-mavx512bf16", "-mavx512vl", "-mavx512bw", "-mf16c")
BF16_CPU_FLAGS = ("avx512_bf16", "avx512bw")  # /proc/cpuinfo names of what BF16_FLAGS compiles for
# kernels for CPUs without AVX-512, compiled with AVX2_FLAGS
AVX2_KERNELS = ("attention_f32", "decode_f32", "half_avx2", "x16_avx2")
AVX2_FLAGS = ("-mavx2", "-mfma", "-mf16c")
AVX2_CPU_FLAGS = ("avx2", "fma", "f16c")
# block_matmul decodes GGUF blocks with float32 arithmetic that must round as gguf-py's dequantize rounds
# decode_f32 rounds each float32 product and sum as torch's separate ops do. x16_avx2: GCC's reassociation of the
# integer sums and its scheduling blind to register pressure spilled a tile's accumulators (1.1-1.5x without them)
KERNEL_FLAGS = {"block_matmul": ("-ffp-contract=off",), "decode_f32": ("-ffp-contract=off",),
                "kquant_vnni": ("-mavx512vnni",), "x16_vnni": ("-mavx512vnni",),
                "x16_avx2": ("-fno-tree-reassoc", "-fsched-pressure", "-fschedule-insns")}
VNNI_CPU_FLAGS = ("avx512_vnni",)  # what kquant_vnni and x16_vnni need besides BF16_CPU_FLAGS
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


def kernel_spec(name: str) -> KernelSpec:
    """The kernel `name` (from name.cpp beside this file) and its flags."""
    source = KERNEL_DIR / f"{name}.cpp"
    if not source.is_file():
        raise ValueError(f"no kernel named {name!r}; kernels: {', '.join(kernel_names())}")
    isa_flags = AVX2_FLAGS if name in AVX2_KERNELS else BF16_FLAGS
    cflags = ("-O3", *OPENMP_FLAGS, *isa_flags, *KERNEL_FLAGS.get(name, ()))
    return KernelSpec(name, source, cflags, OPENMP_FLAGS)


def kernel_names(avx2: bool | None = None) -> list[str]:
    """Every kernel's name, or (avx2 True / False) those of AVX2_KERNELS / the AVX-512 ones."""
    names = sorted(source.stem for source in KERNEL_DIR.glob("*.cpp"))
    return names if avx2 is None else [name for name in names if (name in AVX2_KERNELS) == avx2]


def load(spec: KernelSpec, batch: tuple[KernelSpec, ...] = ()) -> ModuleType | None:
    """The compiled module of `spec`, built first (in parallel with whatever of `batch` the cache lacks too) when
    the cache lacks it; None when it cannot be built or loaded (the reason is printed once)."""
    if not cache.is_built(spec) and spec.name in _build_once((spec, *[s for s in batch if s != spec])):
        return None
    if not cache.is_built(spec):  # interrupted, or another process's build of it failed
        return None
    try:
        return cache.import_built(spec)
    except ImportError as error:
        progress.say(f"ownllm: kernel {spec.name} could not be loaded, so it runs on plain torch: {error}")
        return None


_build_lock = threading.Lock()
_build_failures: dict[str, str] = {}  # name -> why, of the builds this process tried
_tried: set[KernelSpec] = set()


def _build_once(specs: tuple[KernelSpec, ...]) -> dict[str, str]:
    """Builds those of `specs` this process has not tried to build yet -> the failures so far."""
    with _build_lock:
        untried = [spec for spec in specs if spec not in _tried]
        if untried:
            try:
                _build_failures.update(build_missing(untried))
            except OSError as error:  # the cache folder cannot be written, or locked
                progress.say(f"ownllm: the CPU kernels could not be built, so they run on plain torch: {error}")
                _build_failures.update((spec.name, str(error)) for spec in untried)
            _tried.update(untried)
        return _build_failures


def cpu_has_bf16() -> bool:
    """Whether this CPU runs the AVX-512 BF16 kernels (tests skip without it, and fail if they do not build)."""
    return set(BF16_CPU_FLAGS) <= cpu_flags()


def cpu_has_vnni() -> bool:
    """Whether this CPU also runs the AVX-512 VNNI kernel (kquant_vnni: integer dot products on 8-bit activations)."""
    return cpu_has_bf16() and set(VNNI_CPU_FLAGS) <= cpu_flags()


def vnni_kernels(name: str = "kquant_vnni"):
    """The integer block kernels (kernels/kquant_vnni.cpp; x16_vnni.cpp for the 16-row layouts), or None on CPUs without
    AVX-512 VNNI (or no kernels)."""
    return bf16_kernels(name) if cpu_has_vnni() else None


@functools.cache
def bf16_kernels(name: str):
    """A module of AVX-512 BF16 kernels (gemv_bf16, decode_ops, moe_experts...), or None on CPUs without those instructions."""
    if os.environ.get("OWNLLM_NO_KERNELS") == "1":
        return None
    if not cpu_has_bf16():
        logger.info("kernel %s disabled: the CPU lacks %s", name, ", ".join(sorted(set(BF16_CPU_FLAGS) - cpu_flags())))
        return None
    return load(kernel_spec(name), tuple(kernel_spec(other) for other in kernel_names(avx2=False)))


def cpu_has_avx2() -> bool:
    """Whether this CPU runs the AVX2 kernels (every CPU that runs the AVX-512 ones does too)."""
    return set(AVX2_CPU_FLAGS) <= cpu_flags()


@functools.cache
def avx2_kernels(name: str = "x16_avx2"):
    """A module of AVX2_KERNELS, or None on CPUs without AVX2 and FMA (or no kernels)."""
    if os.environ.get("OWNLLM_NO_KERNELS") == "1" or not cpu_has_avx2():
        return None
    return load(kernel_spec(name), tuple(kernel_spec(other) for other in kernel_names(avx2=True)))


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
