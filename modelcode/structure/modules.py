"""What the tree and the diagram say about one module: a short description, and which blocks of a list are
identical (so that 32 layers show as one block "x32")."""

import dataclasses
import functools

from torch import nn

SKIPPED_ATTRIBUTES = {"training"}


def _short(value) -> str | None:
    """A value worth printing in a one-line description, or None."""
    if isinstance(value, bool | int | str):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, functools.partial):
        return _short(value.func)
    if callable(value) and hasattr(value, "__name__") and not isinstance(value, nn.Module | type):
        return value.__name__  # an activation kept as a function (Marian's `act`)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = (f"{k}={_short(v)}" for k, v in vars(value).items() if v is not None and _short(v) is not None)
        return f"{type(value).__name__}({', '.join(fields)})"
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    return None


def attributes(module: nn.Module, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """The plain settings a module keeps (n_heads, sliding_window, use_parallel_residual...), as strings."""
    out = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name in SKIPPED_ATTRIBUTES or name in skip or value is None:
            continue
        text = _short(value)
        if text is not None:
            out[name] = text
    return out


def details(module: nn.Module, skip: frozenset[str] = frozenset()) -> str:
    """torch's own layers by their shapes ("64→192, bias"); any other module by its settings."""
    if isinstance(module, nn.Linear):
        return f"{module.in_features}→{module.out_features}" + (", bias" if module.bias is not None else "")
    if isinstance(module, nn.Embedding):
        return f"{module.num_embeddings}×{module.embedding_dim}"
    if isinstance(module, nn.LayerNorm):
        affine = "" if module.elementwise_affine else ", no affine"
        bias = ", no bias" if module.elementwise_affine and module.bias is None else ""
        return f"{'×'.join(map(str, module.normalized_shape))}, eps={module.eps:g}{affine}{bias}"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        k, s = "×".join(map(str, module.kernel_size)), "×".join(map(str, module.stride))
        return f"{module.in_channels}→{module.out_channels}, kernel {k}, stride {s}"
    if isinstance(module, nn.GELU):
        return "" if module.approximate == "none" else f"approximate={module.approximate}"
    return " ".join(f"{k}={v}" for k, v in attributes(module, skip).items())


def index_attributes(blocks: list[nn.Module]) -> dict[str, frozenset[str]]:
    """{submodule path: attribute names} of the int attributes that hold the block's own index in the list
    (the `layer` number a block hands its KV cache): they differ from block to block by construction, so
    they must not make two blocks look different."""
    found: dict[tuple[str, str], int] = {}
    for i, block in enumerate(blocks):
        for path, m in block.named_modules():
            for name, value in vars(m).items():
                if type(value) is int and value == i:
                    found[path, name] = found.get((path, name), 0) + 1
    out: dict[str, set[str]] = {}
    for (path, name), count in found.items():
        if count == len(blocks):
            out.setdefault(path, set()).add(name)
    return {path: frozenset(names) for path, names in out.items()}


def signature(module: nn.Module, skip: dict[str, frozenset[str]]) -> tuple:
    """Two blocks with equal signatures are built alike: same classes, settings and parameter shapes."""
    return tuple(
        (path, type(m).__name__, details(m, skip.get(path, frozenset())),
         tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters(recurse=False)))
        for path, m in module.named_modules())


def runs(blocks: list[nn.Module]) -> tuple[list[tuple[int, int]], dict[str, frozenset[str]]]:
    """Consecutive runs [(start, stop)] of identical blocks, and the index attributes to leave out."""
    skip = index_attributes(blocks)
    sigs = [signature(b, skip) for b in blocks]
    out: list[tuple[int, int]] = []
    for i, sig in enumerate(sigs):
        if out and sigs[out[-1][0]] == sig:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out, skip


def is_block_list(module: nn.Module) -> bool:
    """A list of blocks: the repeated part of a model."""
    return isinstance(module, nn.ModuleList) and len(module) > 0
