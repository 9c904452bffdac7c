"""The one lookup every pluggable layer piece uses: an implementation by name from its registry, or an error
that names the kind and lists what is known."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


def named(registry: Mapping[str, T], name: str, kind: str) -> T:
    if name not in registry:
        raise ValueError(f"{kind} {name!r} is unknown; choose one of {', '.join(registry)}")
    return registry[name]
