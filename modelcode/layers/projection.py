"""One input through several Linear layers."""

import torch
from torch import nn


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """(linear(x) for each of `linears`), e.g. a token's query, key and value.

    Written as one call because layers that read the same input can share one matmul: where they have been
    fused for decoding (`kernels.fuse_projections`: their weights are slices of one matrix), one kernel
    call computes them all. Otherwise each layer runs on its own.
    """
    fusion = getattr(linears[0], "fusion", None)
    if fusion is not None and len(fusion.members) == len(linears) and all(
            a is b for a, b in zip(fusion.members, linears)):
        return fusion(x)
    return tuple(linear(x) for linear in linears)
