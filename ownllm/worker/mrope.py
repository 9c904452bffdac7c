"""A step's M-RoPE positions (Qwen2.5-VL) for the model runner: the [3, T] positions of the batch's rows, from each
request's prompt positions (computed once, when a request with images arrives) and its delta past the prompt.

Rows follow build_inputs' order: span by span, each span's tokens at positions start, start + 1, .... A request
without images sits at its plain position on all three axes. None when no request in the step has images: the
model then rotates by meta.positions alone (the text model's path, unchanged).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


def step_mrope_positions(spans: Iterable[tuple[tuple[np.ndarray, int] | None, int, int]],
                         device) -> torch.Tensor | None:
    """spans: (the request's (prompt positions [3, P], delta) or None, first position, number of tokens) in batch
    order -> [3, T] int64 on `device`, or None when every request's entry is None."""
    spans = list(spans)
    if all(mrope is None for mrope, _, _ in spans):
        return None
    parts = []
    for mrope, start, num in spans:
        linear = np.arange(start, start + num)
        if mrope is None:
            parts.append(np.broadcast_to(linear, (3, num)))
            continue
        prompt, delta = mrope
        in_prompt = prompt[:, start:start + num]  # [3, tokens still in the prompt]
        after = linear[in_prompt.shape[1]:] + delta  # generated tokens: one position on all three axes
        parts.append(np.concatenate([in_prompt, np.broadcast_to(after, (3, after.shape[0]))], axis=1))
    return torch.from_numpy(np.concatenate(parts, axis=1)).to(device)
