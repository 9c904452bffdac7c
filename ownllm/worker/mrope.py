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
    positions, in_prompt, row = [], [], 0  # in_prompt: (first row, the prompt's [3, n] positions there)
    for mrope, start, num in spans:
        delta = 0
        if mrope is not None:
            prompt, delta = mrope
            if start < prompt.shape[1]:
                in_prompt.append((row, prompt[:, start:start + num]))
        positions.extend(range(start + delta, start + num + delta))  # past the prompt: index + delta on every axis
        row += num
    out = np.tile(np.asarray(positions, dtype=np.int64), (3, 1))  # [3, T]
    for row, block in in_prompt:
        out[:, row:row + block.shape[1]] = block
    return torch.from_numpy(out).to(device)
