"""Feed-forward blocks."""

import torch
import torch.nn.functional as F
from torch import nn

from modelcode.layers.projection import SameInput


class SwiGLU(nn.Module):
    """The gated feed-forward of Llama (Shazeer 2020, "GLU Variants Improve Transformer"):
    w2(silu(w1 x) * w3 x). Names follow Meta's checkpoints: w1 gate, w3 up, w2 down."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.gate_up = SameInput("w1", "w3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(self, x)
        return self.w2(F.silu(gate) * up)
