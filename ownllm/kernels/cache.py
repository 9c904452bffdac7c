"""The kernel cache on disk: which compiled module belongs to this machine's torch, where it lives, who may build it.

One folder per torch version and Python ABI (~/.cache/ownllm/kernels/torch-2.13.0+cpu-cpython-311, or under
$OWNLLM_CACHE) holds one finished module per kernel, named by a digest of everything its binary depends on:
the source and the headers beside it, the compiler flags, torch's version, build and C++ ABI, and the
interpreter's extension ABI. Never the paths of a particular environment, so a second virtual environment with
the same torch loads the modules the first one built instead of rebuilding them. A module appears in the folder
only whole (built elsewhere, then renamed in), so a file there is always one that loaded once.

Whoever builds holds build.lock with flock(2): the kernel drops that lock when its holder dies, however it dies,
so an interrupted build can never leave a lock that blocks the next run. This module compiles nothing
(compile.py does).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import torch

LOCK_NAME = "build.lock"
ATTEMPT_PREFIX = "building-"


@dataclass(frozen=True)
class KernelSpec:
    """One kernel module: its C++ source (headers beside it count too) and the flags it is compiled with."""

    name: str
    source: Path
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...] = ()

    @functools.cached_property
    def digest(self) -> str:
        headers = b"".join(h.read_bytes() for h in sorted(self.source.parent.glob("*.h")))
        parts = [self.source.read_bytes(), headers, " ".join(self.cflags).encode(), " ".join(self.ldflags).encode(),
                 binary_abi().encode()]
        return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]

    @property
    def module_name(self) -> str:
        return f"ownllm_{self.name}_{self.digest}"


def binary_abi() -> str:
    """What a compiled module must match to load: torch's version, build and C++ ABI, and the interpreter's ABI."""
    return " ".join([torch.__version__, str(torch.version.git_version), f"cxx11abi={torch._C._GLIBCXX_USE_CXX11_ABI}",
                     str(sysconfig.get_config_var("EXT_SUFFIX"))])


def cache_folder() -> Path:
    """The folder of this torch's modules (created on first use)."""
    root = Path(os.environ.get("OWNLLM_CACHE") or Path.home() / ".cache" / "ownllm")
    return root / "kernels" / f"torch-{torch.__version__}-{sys.implementation.cache_tag}"


def module_path(spec: KernelSpec) -> Path:
    return cache_folder() / f"{spec.module_name}.so"


def is_built(spec: KernelSpec) -> bool:
    return module_path(spec).is_file()


def import_built(spec: KernelSpec) -> ModuleType:
    """The finished module of `spec` from the cache (is_built(spec) must hold); raises ImportError if it cannot load."""
    module_spec = importlib.util.spec_from_file_location(spec.module_name, module_path(spec))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def build_lock(on_wait: Callable[[str], None]) -> Iterator[None]:
    """Holds the cache folder's build lock; on_wait(holder) is called once if another process holds it first."""
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            on_wait(lock.read().strip() or "another process")
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.truncate(0)
        lock.write(f"process {os.getpid()}")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)
            fcntl.flock(lock, fcntl.LOCK_UN)


def new_attempt_folder() -> Path:
    """A fresh folder for one build (call once, under build_lock): what killed builds left behind is removed first."""
    folder = cache_folder()
    for leftover in folder.glob(f"{ATTEMPT_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=ATTEMPT_PREFIX, dir=folder))


def publish(spec: KernelSpec, built_file: Path) -> None:
    """Moves a module built in an attempt folder into the cache, whole (a rename within one file system)."""
    os.replace(built_file, module_path(spec))
