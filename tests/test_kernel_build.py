"""The kernel cache and its build, on a kernel that compiles in seconds (tests/data/tiny_kernel): a build killed midway
never blocks the next run, two runs at once build once, an edited source or header builds anew (an unchanged one
loads without a compiler), another environment with the same torch reuses the build, and a failed build says why in
one line. Each test has its own OWNLLM_CACHE."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ownllm.kernels import cache
from ownllm.kernels.build import load
from ownllm.kernels.cache import KernelSpec

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "data" / "tiny_kernel" / "tiny.cpp"
RUN_TINY = """
import sys, torch
from pathlib import Path
from ownllm.kernels.build import load
from ownllm.kernels.cache import KernelSpec
module = load(KernelSpec("tiny", Path(sys.argv[1]), ("-O1",)))
print("add:", module.add(2, 3) if module else None, "torch:", torch.__file__, flush=True)
"""


def start_run(cache_dir: Path, pythonpath: str = "", source: Path = TINY, **env_vars: str) -> subprocess.Popen:
    paths = os.pathsep.join(filter(None, [pythonpath, str(REPO)]))
    env = {**os.environ, "OWNLLM_CACHE": str(cache_dir), "PYTHONPATH": paths, **env_vars}
    # Ctrl-C's SIGINT as in a terminal, also where this test runs in the background (bash starts background jobs
    # with SIGINT ignored, and a Python started so never raises KeyboardInterrupt)
    return subprocess.Popen([sys.executable, "-c", RUN_TINY, str(source)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(run: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """Waits for `run` (failing the test after `timeout` seconds, as a run blocked on a lock would) -> its output."""
    try:
        out, err = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        pytest.fail(f"the run did not finish within {timeout}s: {run.communicate()}")
    assert run.returncode == 0, err
    return out, err


def tiny_folder(cache_dir: Path) -> Path:
    return cache_dir / "kernels" / f"torch-{torch.__version__}-{sys.implementation.cache_tag}"


def wait_for_compiler(cache_dir: Path, run: subprocess.Popen) -> None:
    """Returns once `run` is mid-build: torch's builder has written its ninja file and started the compiler."""
    deadline = time.monotonic() + 60
    while not list(tiny_folder(cache_dir).glob(f"{cache.ATTEMPT_PREFIX}*/tiny/build.ninja")):
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "the build did not start within 60s"
        time.sleep(0.05)
    time.sleep(0.5)


def slow_compiler(folder: Path) -> str:
    """A C++ compiler that waits 60 s before each compile (not before torch's version checks), so that a signal sent
    mid-build always finds the build running, however fast the machine compiles tiny.cpp."""
    wrapper = folder / "slow-c++"
    compiler = os.environ.get("CXX", "c++")
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -c "*) sleep 60;; esac\nexec {compiler} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_build_never_blocks_the_next_run(tmp_path, sig):
    first = start_run(tmp_path, CXX=slow_compiler(tmp_path))
    wait_for_compiler(tmp_path, first)
    first.send_signal(sig)
    _, err = first.communicate(timeout=30)
    assert first.returncode != 0
    assert not list(tiny_folder(tmp_path).glob("*.so")), "a killed build published a module"
    assert (tiny_folder(tmp_path) / cache.LOCK_NAME).exists()  # the lock file stays; no one holds its lock
    if sig == signal.SIGINT:
        assert "interrupted" in err

    out, err = finish(start_run(tmp_path))
    assert "add: 5 " in out
    assert "ownllm: building the CPU kernels once for torch" in err
    assert not list(tiny_folder(tmp_path).glob(f"{cache.ATTEMPT_PREFIX}*")), "the killed build's folder was left"


def test_two_runs_at_once_build_once_and_both_go_on(tmp_path):
    runs = [start_run(tmp_path), start_run(tmp_path)]
    outputs = [finish(run) for run in runs]
    assert all("add: 5 " in out for out, _ in outputs)
    assert sum("ownllm: building" in err for _, err in outputs) == 1, outputs
    assert len(list(tiny_folder(tmp_path).glob("*.so"))) == 1


def test_first_build_shows_one_line_then_later_runs_are_silent(tmp_path):
    _, err = finish(start_run(tmp_path))
    lines = [line for line in err.splitlines() if line.startswith("ownllm:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ownllm: building the CPU kernels once for torch {torch.__version__} (cached in ")
    assert " tiny [1/1] done in " in lines[0]
    out, err = finish(start_run(tmp_path))
    assert "add: 5 " in out and "ownllm:" not in err


def test_a_changed_source_or_header_rebuilds_and_an_unchanged_one_loads_as_built(tmp_path):
    """Start-up loads a cached kernel without a compiler run; an edit to its source or a header beside it builds it anew."""
    source = tmp_path / "src" / "tiny.cpp"
    source.parent.mkdir()
    source.write_text(TINY.read_text())
    cache_dir = tmp_path / "cache"
    assert "add: 5 " in finish(start_run(cache_dir, source=source))[0]
    out, err = finish(start_run(cache_dir, source=source))
    assert "add: 5 " in out and "ownllm:" not in err
    source.write_text(TINY.read_text().replace("return a + b;", "return a + b + 1;"))
    out, err = finish(start_run(cache_dir, source=source))
    assert "add: 6 " in out and "ownllm: building" in err, err
    (source.parent / "extra.h").write_text("// a header beside the kernel is part of its build\n")
    out, err = finish(start_run(cache_dir, source=source))
    assert "add: 6 " in out and "ownllm: building" in err, err
    assert len(list(tiny_folder(cache_dir).glob("*.so"))) == 3


def test_another_environment_with_the_same_torch_reuses_the_build(tmp_path):
    """A second environment: the same torch reached by another path, so torch's include paths differ."""
    finish(start_run(tmp_path / "cache"))
    other_env = tmp_path / "env2"
    other_env.mkdir()
    (other_env / "torch").symlink_to(Path(torch.__file__).parent)
    out, err = finish(start_run(tmp_path / "cache", pythonpath=str(other_env)))
    assert f"torch: {other_env}" in out and "add: 5 " in out
    assert "ownllm:" not in err, err


def test_failed_build_says_why_in_one_line_and_falls_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OWNLLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "broken.cpp"
    source.write_text('#include <pybind11/pybind11.h>\nint f() { return no_such_thing; }\n'
                      'PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("f", &f); }\n')
    assert load(KernelSpec("broken", source, ("-O1",))) is None
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("ownllm: kernel broken could not be built, so it runs on plain torch: "
                                "broken.cpp:2:18: error: "), lines
    assert "no_such_thing" in lines[-1]
    assert "broken failed [1/1] done in" in lines[-2]


def test_the_cache_key_names_the_binary_interface_not_the_environment():
    abi = cache.binary_abi()
    assert torch.__version__ in abi and "cxx11abi=" in abi and sys.implementation.cache_tag in abi
    assert str(Path(torch.__file__).parent) not in abi and sys.prefix not in abi


def test_unwritable_cache_says_why_in_one_line_and_falls_back(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("OWNLLM_CACHE", str(tmp_path / "file"))  # a file where the cache folder should be
    assert load(KernelSpec("tiny_unwritable", TINY, ("-O1",))) is None
    err = capsys.readouterr().err
    assert err.startswith("ownllm: the CPU kernels could not be built, so they run on plain torch: ") and "file" in err
    assert len(err.splitlines()) == 1
