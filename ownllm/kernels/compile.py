"""Compiles kernel modules into the cache: each in a child process that runs torch's extension builder in a folder
of its own, as many at once as this process may use cores, under the cache's build lock, showing one progress line.

A kernel that fails to build is reported in one line with the compiler's reason (its callers then run on plain
torch). An interrupted build kills its children and leaves nothing the next run must wait for or clean by hand.
Never imports a built module into this process (cache.py does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ownllm.kernels import cache, progress
from ownllm.kernels.cache import KernelSpec

_CHILD = "import json, sys\nfrom torch.utils.cpp_extension import load\nload(**json.loads(sys.argv[1]))\n"
_COMPILER_ERROR = re.compile(r"([^\s/]+:\d+:\d+: (?:fatal )?error: .*)")


def build_missing(specs: list[KernelSpec], what: str = "the CPU kernels") -> dict[str, str]:
    """Builds those of `specs` that the cache lacks (waiting first if another process builds them) -> {name: why}
    for those that could not be built."""
    def on_wait(holder: str) -> None:
        progress.say(f"ownllm: waiting for {holder}, which is building {what} "
                     f"(lock: {progress.short_path(cache.cache_folder() / cache.LOCK_NAME)})")

    with cache.build_lock(on_wait):
        missing = [spec for spec in specs if not cache.is_built(spec)]
        if not missing:
            return {}
        attempt = cache.new_attempt_folder()
        try:
            return _build(missing, attempt, what)
        finally:
            shutil.rmtree(attempt, ignore_errors=True)


def _build(specs: list[KernelSpec], attempt: Path, what: str) -> dict[str, str]:
    num_jobs = min(len(specs), len(os.sched_getaffinity(0)))
    line = progress.ProgressLine(
        f"ownllm: building {what} once for torch {torch.__version__} (cached in "
        f"{progress.short_path(cache.cache_folder())}){f', {num_jobs} at a time' if num_jobs > 1 else ''}:")
    started = time.monotonic()
    waiting, running, failures = list(specs), {}, {}
    try:
        while waiting or running:
            while waiting and len(running) < num_jobs:
                spec = waiting.pop(0)
                running[_start(spec, attempt)] = spec
            for child in _wait_any(list(running)):
                spec = running.pop(child)
                why = _finish(spec, child, attempt)
                if why:
                    failures[spec.name] = why
                num_done = len(specs) - len(waiting) - len(running)
                line.add(f" {spec.name}{' failed' if why else ''} [{num_done}/{len(specs)}]")
    except BaseException:
        for child in running:
            child.kill()
            child.wait()
        line.end(" interrupted")
        raise
    line.end(f" done in {time.monotonic() - started:.0f}s")
    _report(failures)
    return failures


def _start(spec: KernelSpec, attempt: Path) -> subprocess.Popen:
    folder = attempt / spec.name
    folder.mkdir()
    arguments = dict(name=spec.module_name, sources=[str(spec.source)], extra_cflags=list(spec.cflags),
                     extra_ldflags=list(spec.ldflags), build_directory=str(folder), verbose=False)
    with open(folder / "build.log", "w") as log:
        return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(arguments)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def _wait_any(children: list[subprocess.Popen]) -> list[subprocess.Popen]:
    while True:
        finished = [child for child in children if child.poll() is not None]
        if finished:
            return finished
        time.sleep(0.05)


def _finish(spec: KernelSpec, child: subprocess.Popen, attempt: Path) -> str | None:
    """Publishes what `child` built -> None, or why it failed."""
    folder = attempt / spec.name
    built = folder / f"{spec.module_name}.so"
    if child.returncode == 0 and built.is_file():
        cache.publish(spec, built)
        return None
    return failure_reason((folder / "build.log").read_text(errors="replace"), child.returncode)


def failure_reason(output: str, returncode: int) -> str:
    """The one line of a failed build's output that says why: the compiler's (or linker's) first error, else the
    last line that is neither ninja's nor an echoed command."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        match = _COMPILER_ERROR.search(line)
        if match:
            return match.group(1)
    linker = [line for line in lines if "ld: " in line]
    if linker:
        return linker[0]
    said = [line for line in lines if not line.startswith(("ninja: ", "FAILED: ", "[")) and "TORCH_EXTENSION_NAME" not in line]
    return said[-1] if said else f"the build exited with status {returncode}"


def _report(failures: dict[str, str]) -> None:
    by_reason: dict[str, list[str]] = {}
    for name, why in failures.items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        subject = f"kernel {names[0]} could not be built, so it runs" if len(names) == 1 else \
            f"kernels {', '.join(names)} could not be built, so they run"
        progress.say(f"ownllm: {subject} on plain torch: {why}")
