"""Weight maps: checkpoint tensor names -> our parameter names, as data, one module per architecture.

A map is a dict from a checkpoint name pattern (`{}` stands for a layer index) to:
- a string: our name for the same tensor;
- None: a tensor that is not a weight (e.g. a cached rotary table) and is skipped;
- a `Rule`: our name(s) plus a named transform (permute for rotary layout, split of a fused qkv...),
  or `optional(name)`: a head that checkpoints often carry but this config may not build (BERT's
  pooler in a BertForMaskedLM file): loaded when the model has it, skipped when it does not.
Any name that matches no pattern is an error: nothing is dropped silently.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rule:
    targets: tuple[str, ...]
    transform: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]] | None = None  # (tensor, config) -> tensor(s)
    optional: bool = False  # skip it when the model has no such parameter


def optional(name: str) -> Rule:
    return Rule((name,), optional=True)


WeightMap = dict[str, "str | None | Rule"]


def compile_map(weight_map: WeightMap) -> list[tuple[re.Pattern, str | None | Rule]]:
    return [(re.compile(re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in weight_map.items()]


def lookup(compiled, name: str) -> tuple[list[str], Callable | None, bool] | None:
    """Our names for one checkpoint tensor, the transform to apply and whether the targets are optional
    ([] : skip it; None: an unknown name)."""
    for pattern, target in compiled:
        m = pattern.match(name)
        if not m:
            continue
        layer = m.group(1) if m.groups() else None
        if target is None:
            return [], None, False
        rule = Rule((target,)) if isinstance(target, str) else target
        targets = [t.replace("{}", layer, 1) if layer is not None else t for t in rule.targets]
        return targets, rule.transform, rule.optional
    return None


def invert(weight_map: WeightMap) -> WeightMap:
    """Our names -> checkpoint names: the same map read backwards, for writing a model in its checkpoint's
    layout. Only plain renames invert; a tensor whose rule has a transform (or maps several tensors to one)
    is left out, and `lookup` then reports it as unknown."""
    inverse: WeightMap = {}
    for theirs, ours in weight_map.items():
        if isinstance(ours, str):
            inverse.setdefault(ours, theirs)  # the first checkpoint name is the canonical one
    return inverse
