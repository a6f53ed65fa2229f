"""`PackedBF16Linear`: a bfloat16 Linear whose weight is laid out for modelcode's decoding kernel, swapped
in from outside the model (as the quantized layers are) by `pack_bf16_linears`, part of
`install_cpu_kernels`. The weight is rearranged, not copied: the model keeps one copy of it."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelcode.kernels.cpu import OUTPUTS_PER_BLOCK, bf16_mm, kernels_available, pack_bf16, unpack_lanes
from modelcode.swap import embedding_weights, replace_module


class PackedBF16Linear(nn.Module):
    # The kernel takes any number of rows (decode steps, batches, prompts): it reuses each weight line for 4
    # rows at a time from registers and each block of weights for the next rows from cache (on AMX, 16 rows
    # at a time), so it keeps up with a dense matmul, which would first have to put the weight back in order,
    # a copy of it per call (see BENCHMARKS.md).
    kernel_max_rows = math.inf
    outputs_stack = True  # its tensors stack along the outputs into one layer of this kind (kernels/fuse.py)

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", pack_bf16(linear.weight.detach()))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            y = bf16_mm(x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, unpack_lanes(self.weight).to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packable(linear: nn.Module, tied: set[int]) -> bool:
    w = linear.weight
    return (type(linear) is nn.Linear and w.dtype == torch.bfloat16 and w.device.type == "cpu"
            and linear.out_features % OUTPUTS_PER_BLOCK == 0 and linear.in_features % 4 == 0 and id(w) not in tied)


def pack_bf16_linears(model: nn.Module) -> int:
    """Swap the model's bfloat16 CPU `nn.Linear` layers for `PackedBF16Linear`, in place, where the kernel
    runs here; returns how many. A head tied to the embeddings stays (packing would copy the matrix)."""
    if not kernels_available():
        return 0
    tied = embedding_weights(model)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and packable(m, tied)]
    for name, linear in layers:
        replace_module(model, name, PackedBF16Linear(linear))
    return len(layers)
