"""The AVX-512 BF16 kernel modules for the kernel tests: the test is skipped on a CPU without the instructions,
and fails where it has them but the module did not build."""

from __future__ import annotations

from typing import Callable

import pytest

from ownllm.kernels.build import cpu_has_bf16


def built_kernel(get: Callable[[], object], what: str):
    """get() -> the module (None when it did not build); what: its name in the skip message."""
    if not cpu_has_bf16():
        pytest.skip(f"{what} cannot run on this CPU")
    module = get()
    assert module is not None, f"{what} failed to build (see the log)"
    return module
