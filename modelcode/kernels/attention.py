"""Decoding's attention on CPU through modelcode's kernel (`attention.cpp`): swapped in for a model's
`layers.ScaledDotProductAttention` modules from outside, by `install_cpu_kernels`."""

import torch

from modelcode.kernels.cpu import decode_attention, decode_attention_fits
from modelcode.layers import ScaledDotProductAttention
from modelcode.swap import replace_module


class CPUDecodeAttention(ScaledDotProductAttention):
    """For one query per sequence, the kernel's single pass over the cache as it is stored; anything else
    (prompts, shapes or dtypes the kernel does not take) the plain computation."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if q.shape[2] == 1 and decode_attention_fits(q, k, v, mask):
            return decode_attention(q, k, v, mask)
        return super().forward(q, k, v, mask)


def swap_decode_attention(model: torch.nn.Module) -> int:
    """Swap each `ScaledDotProductAttention` of the model for `CPUDecodeAttention`, in place; returns how many."""
    names = [name for name, m in model.named_modules() if type(m) is ScaledDotProductAttention]
    for name in names:
        replace_module(model, name, CPUDecodeAttention())
    return len(names)
