"""Linear layers that read the same input."""

import torch
from torch import nn


class SameInput(nn.Module):
    """Declares which Linear layers of its owner read the same input, and runs them on it: an attention
    block writes `self.qkv = SameInput("wq", "wk", "wv")` and `q, k, v = self.qkv(self, x)`.

    The layers stay the owner's own, under the checkpoint's names; this module holds only their names. It
    is what a kernel that computes such layers as one matmul swaps out, from outside the model
    (`kernels/fuse.py`).
    """

    def __init__(self, *names: str):
        super().__init__()
        self.names = names

    def forward(self, owner: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(owner, name)(x) for name in self.names)

    def extra_repr(self) -> str:
        return ", ".join(self.names)
