"""Fusing the Linear layers that read the same input (q, k and v; a SwiGLU's gate and up) into one matmul for
decoding, from outside the model, as `CompiledModel` does on CPU.

A decoding step is a chain of matrix-vector products, each of which pays a fixed cost (a kernel call, the
threads started and joined, memory streams started afresh) besides reading its weights; for small
projections such as k and v (llama-1b: 256 x 2048) that cost is a large part of the product. Here the
sibling layers' weights are concatenated, once, into one matrix, and each layer's own tensors become slices
of it (no second copy): the layers still work alone, with their names and state dict unchanged, while
`layers.project(x, wq, wk, wv)` computes all three with one kernel call (llama-1b int4: ~155 -> ~90 calls
per token).

Fused only where the kernels' weight layouts stack along the output dimension: modelcode's CPU kernels for
bfloat16 (`PackedBF16Linear`), int8 (`PackedInt8Linear`) and int4 (`PackedInt4Linear` on its own kernel).
"""

import copy

import torch
from torch import nn

from modelcode.kernels.linear import PackedBF16Linear
from modelcode.quantization.linear import PackedInt4Linear, PackedInt8Linear

# Children of one module that take the same input, by name (Meta's Llama names: attention, SwiGLU).
SIBLINGS = (("wq", "wk", "wv"), ("w1", "w3"))



class Fusion:
    """Sibling layers whose weights are slices of `fused`'s: calling it computes all their outputs at once.

    A plain object, not a module, so that the model's module tree and state dict stay as they were.
    """

    def __init__(self, members: tuple[nn.Module, ...]):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.fused = _concatenated(members)
        for m in members:
            m.fusion = self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Past the rows their kernel takes (int8 and int4: 16; bf16's takes any number) the layers run one by
        # one: a dense matmul first dequantizes its weight, and one layer's (llama-1b w1: 23 MB in bf16) fits the
        # last-level cache where a fused pair's does not (measured when bf16 prompts ran densely, llama-1b,
        # 128-token prompt, interleaved: 117-137 tok/s one by one, 103-107 fused).
        if x.numel() // x.shape[-1] > self.fused.kernel_max_rows:
            return tuple(m(x) for m in self.members)
        return self.fused(x).split(self.sizes, dim=-1)


def fusable(layer: nn.Module) -> bool:
    """Whether the layer's tensors (weight, scales, bias) stack along their first dimension into one layer
    of the same kind."""
    if isinstance(layer, PackedInt4Linear):
        return layer.kernel == "avx512-bf16"
    return isinstance(layer, (PackedBF16Linear, PackedInt8Linear)) and layer.weight.device.type == "cpu"


def _same_kind(layers: list[nn.Module]) -> bool:
    first = layers[0]
    return all(type(m) is type(first) and m.in_features == first.in_features
               and getattr(m, "group_size", None) == getattr(first, "group_size", None)
               and (m.bias is None) == (first.bias is None)
               and [t.dtype for t in m.state_dict().values()] == [t.dtype for t in first.state_dict().values()]
               for m in layers)


def _concatenated(members: tuple[nn.Module, ...]) -> nn.Module:
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


def fuse_projections(model: nn.Module) -> int:
    """Fuse each group of sibling layers (see SIBLINGS) that `fusable` takes, in place; returns how many groups."""
    groups = 0
    for module in list(model.modules()):
        for names in SIBLINGS:
            layers = [getattr(module, n, None) for n in names]
            if all(isinstance(m, nn.Module) and fusable(m) and getattr(m, "fusion", None) is None for m in layers) \
                    and _same_kind(layers):
                Fusion(tuple(layers))
                groups += 1
    return groups
