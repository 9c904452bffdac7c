"""matplotlib for the plots `ownllm eval --plot` and `ownllm bench --plot` draw: an optional extra
(`pip install 'ownllm[plot]'`), so its absence is one clear error, checked before any work starts."""

from __future__ import annotations

MISSING = "the plot needs matplotlib: pip install 'ownllm[plot]'"


def pyplot():
    """-> matplotlib.pyplot on the file-only Agg backend; ValueError naming the extra when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(MISSING) from None
    return plt
