"""The gated SwiGLU MLP of Llama-family models (gate_proj, up_proj, down_proj; HF names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ownllm.kernels.build import decode_ops
from ownllm.layers.linear import fuse_linears
from ownllm.layers.module import Module
from ownllm.layers.parallel import column_linear, row_linear


class GatedMLP(Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        # tensor parallel: gate and up split by rows (so the fused gate_up holds both halves of the rank's rows),
        # down by columns
        self.gate_proj = column_linear(hidden_size, intermediate_size, bias, "MLP intermediate size")
        self.up_proj = column_linear(hidden_size, intermediate_size, bias, "MLP intermediate size")
        self.down_proj = row_linear(intermediate_size, hidden_size, bias, "MLP intermediate size")

    def fuse(self) -> None:
        """After loading: one gate_up matmul instead of two."""
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        if hasattr(self, "gate_up_proj"):
            gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
            ops = decode_ops(gate_up)
            if ops is not None:
                return self.down_proj(ops.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
