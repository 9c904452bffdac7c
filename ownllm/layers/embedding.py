"""Token embeddings: nn.Embedding's parameter (so HF names load as is), without its random init.

Every weight comes from the checkpoint, and nn.Embedding's normal_ init on the meta device costs 0.8 s
the first time (torch imports its Python decompositions for it), a sixth of the 1B shape's start-up.
"""

from __future__ import annotations

from torch import nn

from ownllm.layers.module import Module


class Embedding(Module, nn.Embedding):
    def reset_parameters(self) -> None:  # the checkpoint's weights replace it
        pass
