"""LoRA (Hu et al. 2021, arXiv:2106.09685), applied from outside a model by wrapping its Linear layers.

A wrapped layer computes  y = W x + (alpha / r) B A x  with A (r, in) drawn as Kaiming-uniform and B (out, r)
zero, so training starts from the base model's exact outputs. Only A and B train; W stays frozen, and may be
an int8 or int4 quantized layer (QLoRA, Dettmers et al. 2023): the adapters then train in the activations'
dtype against the dequantized weight. `merge_lora` folds B A into W and puts plain Linear layers back.

Layer names are the model's own (`wq`, `wv`, `w1`...) or the checkpoint's (`q_proj`, `v_proj`, `gate_proj`...),
translated through the architecture's weight map: one table of names, the one loading uses.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelcode.quantization import (
    Int4Linear,
    Int8Linear,
    PackedInt4Linear,
    PackedInt8Linear,
    dequantized_weight,
)
from modelcode.swap import replace_module

QUANTIZED = (Int8Linear, Int4Linear)


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # checkpoint or model names; ("all",): every projection
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023), as peft's flag

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen base layer (nn.Linear, Int8Linear or Int4Linear) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.scale = base, scale
        self.in_features, self.out_features = base.in_features, base.out_features
        dtype = base.scales.dtype if isinstance(base, QUANTIZED) else base.weight.dtype
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and peft's) initialisation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain Linear with W + scale B A, in the base's floating-point dtype."""
        w = base_weight(self.base)
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_((w.float() + delta).to(w.dtype))
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear.requires_grad_(False)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) floating-point weight of a Linear or quantized layer."""
    return dequantized_weight(layer) if isinstance(layer, QUANTIZED) else layer.weight


def layer_names(weight_map: dict) -> dict[str, str]:
    """Checkpoint layer name -> ours, from the weight map's `...{}.q_proj.weight -> ...{}.attention.wq.weight`
    rules (e.g. q_proj -> wq); our own names map to themselves."""
    names = {}
    for theirs, ours in weight_map.items():
        if isinstance(ours, str) and theirs.endswith(".weight") and ours.endswith(".weight"):
            t, o = theirs.rsplit(".", 2)[-2], ours.rsplit(".", 2)[-2]
            names.setdefault(t, o)
            names.setdefault(o, o)
    return names


def target_layers(model: nn.Module, targets: tuple[str, ...], weight_map: dict) -> list[str]:
    """Full names of the Linear layers of the transformer blocks that `targets` name ("all": every one)."""
    candidates = [name for name, m in model.named_modules()
                  if isinstance(m, (nn.Linear, *QUANTIZED)) and name.startswith("layers.")]
    if "all" in targets:
        return candidates
    names = layer_names(weight_map)
    unknown = [t for t in targets if t not in names or not any(c.endswith("." + names[t]) for c in candidates)]
    if unknown:
        known = sorted({t for t, o in names.items() if any(c.endswith("." + o) for c in candidates)})
        raise ValueError(f"unknown LoRA target layer(s) {', '.join(map(repr, unknown))}: use 'all' or names "
                         f"among {', '.join(known)}")
    leaves = {names[t] for t in targets}
    return [name for name in candidates if name.rsplit(".", 1)[-1] in leaves]


def apply_lora(model: nn.Module, config: LoRAConfig, weight_map: dict) -> list[str]:
    """Freeze every parameter of `model`, wrap the target layers in `LoRALinear` (in place) and return their
    names. Only the adapters' A and B require grad afterwards; gradients flow through int8 and int4 layers."""
    if config.r < 1:
        raise ValueError(f"LoRA rank r={config.r}: it must be at least 1")
    if any(isinstance(m, PackedInt8Linear | PackedInt4Linear) for m in model.modules()):
        raise ValueError("this model's quantized layers are packed for a kernel, which LoRA does not wrap: load the "
                         "original checkpoint and quantize it for training (--quantize, or quantize(pack=False))")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.kernel_max_rows = 0  # its few-row kernel has no backward: dequantize-then-matmul, as for many rows
    names = target_layers(model, config.targets, weight_map)
    for name in names:
        replace_module(model, name, LoRALinear(model.get_submodule(name), config.r, config.scale, config.dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and put a plain Linear in its place, in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            replace_module(model, name, m.merged())
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
