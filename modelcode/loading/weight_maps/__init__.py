"""Weight maps: checkpoint tensor names -> our parameter names, as data, one module per architecture.

A map is a dict from a checkpoint name pattern (`{}` stands for a layer index) to:
- a string: our name for the same tensor;
- None: a tensor that is not a weight (e.g. a cached rotary table) and is skipped;
- a `Rule`: our name(s) plus a named transform (permute for rotary layout, split of a fused qkv...).
Any name that matches no pattern is an error: nothing is dropped silently.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rule:
    targets: tuple[str, ...]
    transform: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]  # (tensor, config) -> tensor(s)


WeightMap = dict[str, "str | None | Rule"]


def compile_map(weight_map: WeightMap) -> list[tuple[re.Pattern, str | None | Rule]]:
    return [(re.compile(re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in weight_map.items()]


def lookup(compiled, name: str) -> tuple[list[str], Callable | None] | None:
    """Our names for one checkpoint tensor and the transform to apply ([] : skip it; None: unknown)."""
    for pattern, target in compiled:
        m = pattern.match(name)
        if not m:
            continue
        layer = m.group(1) if m.groups() else None
        if target is None:
            return [], None
        targets = [target] if isinstance(target, str) else list(target.targets)
        if layer is not None:
            targets = [t.replace("{}", layer, 1) for t in targets]
        return targets, None if isinstance(target, str) else target.transform
    return None
