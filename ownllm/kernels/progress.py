"""What a kernel build shows the user: one stderr line that says what is built, that it happens once, where it is
kept, and how far it is, growing as kernels finish:

    ownllm: building the CPU kernels once for torch 2.13.0+cpu (cached in ~/.cache/ownllm/kernels/torch-2.13.0+cpu-cpython-311), 2 at a time: decode_ops [1/6] gemv_bf16 [2/6] ... done in 41s

plus one line per other event (a failure and its reason, a wait on another process's build). A front end that owns
the terminal (the CLI's spinner) shows them its own way inside `shown_by(show)`; otherwise they go to stderr.
Never decides what to build.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

# show(text, is_final): the line so far (is_final=False, again each time it grows), or a finished line
Show = Callable[[str, bool], None]
_show: Show | None = None


@contextlib.contextmanager
def shown_by(show: Show) -> Iterator[None]:
    """Routes kernel build messages to show(text, is_final) while inside."""
    global _show
    previous, _show = _show, show
    try:
        yield
    finally:
        _show = previous


def say(text: str) -> None:
    """One finished line."""
    if _show is not None:
        _show(text, True)
    else:
        print(text, file=sys.stderr, flush=True)


def short_path(path: Path) -> str:
    home = str(Path.home())
    return "~" + str(path)[len(home):] if str(path).startswith(home + "/") else str(path)


class ProgressLine:
    """One line that grows: the opening words, then a piece per finished step, then the end."""

    def __init__(self, opening: str) -> None:
        self.text = ""
        self.num_written = 0  # characters of text already on stderr
        self.add(opening)

    def add(self, piece: str) -> None:
        self.text += piece
        self._show(is_final=False)

    def end(self, piece: str) -> None:
        self.text += piece
        self._show(is_final=True)

    def _show(self, is_final: bool) -> None:
        if _show is not None:
            _show(self.text, is_final)
            return
        sys.stderr.write(self.text[self.num_written:] + ("\n" if is_final else ""))
        sys.stderr.flush()
        self.num_written = len(self.text)
