"""Layers that read the same input (q, k and v; a SwiGLU's gate and up) computed as one matmul for decoding,
swapped in from outside the model by `install_cpu_kernels` and `install_gpu_kernels`.

A decoding step is a chain of matrix-vector products, each of which pays a fixed cost (a kernel call, the
threads started and joined, memory streams started afresh) besides reading its weights; for small
projections such as k and v (llama-1b: 256 x 2048) that cost is a large part of the product. A model names
the layers that read the same input with `layers.SameInput`; where those layers are modelcode's packed CPU
layers, their weights are concatenated, once, into one matrix, each layer's own tensors become slices of it
(no second copy, names and state dict unchanged), and the `SameInput` is swapped for `FusedSameInput`, which
computes them all with one kernel call (llama-1b int4: ~155 -> ~90 calls per token).

On a GPU the same holds for a one-row GEMV: k and v alone are too small to fill the GPU, and each matrix
is a launch, so there plain Linear layers are fused too.

Fused only where a layer says its tensors stack along the output dimension into one layer of its kind
(`outputs_stack`: modelcode's bfloat16, int8 and int4 layers, packed for the CPU or on triton's layout), or
is a plain Linear and `linear` is asked for.
"""

import copy

import torch
from torch import nn

from modelcode.layers import SameInput
from modelcode.swap import replace_module


class FusedSameInput(SameInput):
    """A `SameInput` whose layers' weights are slices of `fused`'s: one call computes all their outputs.

    `fused` is kept outside the module tree, so that the model's parameters, buffers and state dict stay
    as they were (its tensors are the layers' own, stacked).
    """

    def __init__(self, names: tuple[str, ...], fused: nn.Module, sizes: list[int]):
        super().__init__(*names)
        self.sizes = sizes
        object.__setattr__(self, "fused", fused)  # not a child module: see above

    def forward(self, owner: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Past the rows the kernel takes (int8 and int4: 16; bf16: any number) the layers run one by one: a dense
        # matmul first dequantizes its weight, and one layer's fits the last-level cache more often than the
        # fused matrix does.
        if x.numel() // x.shape[-1] > getattr(self.fused, "kernel_max_rows", float("inf")):
            return super().forward(owner, x)
        return self.fused(x).split(self.sizes, dim=-1)


def fusable(layer: nn.Module, linear: bool) -> bool:
    """Whether the layer's tensors (weight, scales, bias) stack along their first dimension into one layer
    of the same kind, and it is to be fused: a plain Linear only with `linear`."""
    return getattr(layer, "outputs_stack", False) or (linear and type(layer) is nn.Linear)


def _same_kind(layers: list[nn.Module]) -> bool:
    first = layers[0]
    devices = {t.device for m in layers for t in m.state_dict().values()}
    return len(devices) == 1 and all(type(m) is type(first) and m.in_features == first.in_features
               and getattr(m, "group_size", None) == getattr(first, "group_size", None)
               and (m.bias is None) == (first.bias is None)
               and [t.dtype for t in m.state_dict().values()] == [t.dtype for t in first.state_dict().values()]
               for m in layers)


def _concatenated(members: list[nn.Module]) -> nn.Module:
    """A layer of the members' kind whose tensors are theirs stacked; theirs become views of its."""
    fused = copy.copy(members[0])  # the same settings, with its own tensors (set below)
    fused._parameters, fused._buffers = dict(fused._parameters), dict(fused._buffers)
    fused.out_features = sum(m.out_features for m in members)
    names = [name for name, t in [*fused._parameters.items(), *fused._buffers.items()] if t is not None]
    for name in names:
        parts = [getattr(m, name) for m in members]
        whole = torch.cat([p.detach() for p in parts])
        _put(fused, name, whole)
        for m, view in zip(members, whole.split([p.shape[0] for p in parts])):
            _put(m, name, view)
    return fused


def _put(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[name] = tensor


def fuse_projections(model: nn.Module, linear: bool = False) -> int:
    """Swap each `SameInput` whose layers `fusable` takes, all of one kind and on one device, for a
    `FusedSameInput`, in place; returns how many. `linear`: plain Linear layers too."""
    groups = 0
    for name, same in list(model.named_modules()):
        if type(same) is not SameInput:
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        layers = [getattr(owner, n) for n in same.names]
        if all(fusable(m, linear) for m in layers) and _same_kind(layers):
            replace_module(model, name, FusedSameInput(same.names, _concatenated(layers),
                                                       [m.out_features for m in layers]))
            groups += 1
    return groups
