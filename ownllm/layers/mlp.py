"""The gated MLP of Llama-family models (gate_proj, up_proj, down_proj; HF names): SwiGLU, or GeGLU (Gemma's
gelu_pytorch_tanh), and the activations configs name by their transformers names."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ownllm.kernels.build import decode_ops
from ownllm.layers.linear import fuse_linears
from ownllm.layers.module import Module
from ownllm.layers.parallel import column_linear, row_linear


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str, architecture: str):
    """The activation function a config names, or ValueError naming it and the supported ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act {name!r} is not supported for {architecture}; "
                         f"supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, act: str = "silu") -> None:
        super().__init__()
        self.act_name, self.act = act, ACTIVATIONS[act]
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
            ops = decode_ops(gate_up) if self.act_name == "silu" else None
            if ops is not None:
                return self.down_proj(ops.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)
