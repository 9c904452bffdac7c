"""Grammar backends for structured outputs: a request's StructuredOutputsParams -> a Grammar that says, step by
step, which tokens may come next (as a bitmask row) and takes the tokens sampled. Backends are registered by
name; llguidance is the default, and another (xgrammar) plugs in behind the same interface.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

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


# RFC 3339 lets a time's fraction of a second run on without end, and a small model, greedy, will write digits until
# max_tokens: bound those strings to nanoseconds (hh:mm:ss.fffffffff+hh:mm), a subset every validator accepts.
FORMAT_MAX_LENGTHS = {"time": 24, "date-time": 35}
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
FORMAT_PATTERNS = {"time": f"^{_TIME}$",  # the same strings, for a backend that ignores maxLength beside a format
                   "date-time": f"^[0-9]{{4}}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]{_TIME}$"}
_LITERALS = ("const", "enum", "default", "examples")  # values, not schemas: left as written


def bounded_schema(schema: Any, as_pattern: bool = False) -> Any:
    """The JSON schema with each string of an unbounded format (FORMAT_MAX_LENGTHS) bounded: a maxLength where it
    has none, or (as_pattern) the format replaced by its bounded pattern where it has no pattern."""
    if isinstance(schema, list):
        return [bounded_schema(item, as_pattern) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: value if key in _LITERALS else bounded_schema(value, as_pattern) for key, value in schema.items()}
    name = schema.get("format")
    if not isinstance(name, str) or name not in FORMAT_MAX_LENGTHS:
        return bounded
    if as_pattern and "pattern" not in schema:
        del bounded["format"]
        bounded["pattern"] = FORMAT_PATTERNS[name]
    elif not as_pattern and "maxLength" not in schema:
        bounded["maxLength"] = FORMAT_MAX_LENGTHS[name]
    return bounded
