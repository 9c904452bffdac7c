"""Grammar backends for structured outputs: a request's StructuredOutputsParams -> a Grammar that says, step by
step, which tokens may come next (as a bitmask row) and takes the tokens sampled. Backends are registered by
name; llguidance is the default, and another (xgrammar) plugs in behind the same interface.
"""

from __future__ import annotations

import importlib
from typing import Callable, Protocol

import numpy as np

from ownllm.sampling_params import StructuredOutputsParams
from ownllm.tokenizer import Tokenizer


class Grammar(Protocol):
    def accept(self, token_ids: list[int]) -> bool:
        """Advances over sampled tokens; False if one was not allowed (a bug upstream: masks forbid them)."""

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Writes the allowed next tokens into bitmask[row] (int32 words, token t = bit t % 32 of word t // 32)."""

    def is_terminated(self) -> bool:
        """Whether the output is complete: only an end token may follow."""


class GrammarBackend(Protocol):
    def compile(self, spec: StructuredOutputsParams) -> Grammar:
        """Raises ValueError naming what the backend cannot compile (the request is refused, never unconstrained)."""


GRAMMAR_BACKENDS: dict[str, Callable[[Tokenizer, int], GrammarBackend]] = {}
BUILTIN_BACKENDS = {"llguidance": "ownllm.structured_output.llguidance_backend",
                    "xgrammar": "ownllm.structured_output.xgrammar_backend"}  # name -> module, imported on use


def check_backend(name: str) -> None:
    """Raises ValueError when the backend is unknown or its package is missing (before anything loads)."""
    if name in GRAMMAR_BACKENDS:
        return
    if name not in BUILTIN_BACKENDS:
        raise ValueError(f"unknown structured-output backend {name!r}; known: {', '.join(BUILTIN_BACKENDS)}")
    try:
        importlib.import_module(BUILTIN_BACKENDS[name])  # registers itself
    except ImportError as error:
        raise ValueError(f"the {name} structured-output backend needs `pip install 'ownllm[{name}]'` "
                         f"({error})") from None


def grammar_backend(name: str, tokenizer: Tokenizer, vocab_size: int) -> GrammarBackend:
    check_backend(name)
    return GRAMMAR_BACKENDS[name](tokenizer, vocab_size)
