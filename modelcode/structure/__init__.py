"""Views of a model's structure: `describe(model)`, a text tree with shapes, parameter counts and dtypes, and
`draw(model, "model.svg", "model.png")`, a diagram of the architecture traced from the model itself.

Both run the model once on a small sample batch for its task, watching which modules and torch functions
it calls (see `trace.py`); `empty_model(folder)` builds a checkpoint's model on the meta device from its
config alone, so that looking at a 70B model costs no memory and no weight reading.
"""

from pathlib import Path

import torch
from torch import nn

from modelcode.structure import sample as samples
from modelcode.structure.graph import Diagram, build
from modelcode.structure.trace import Trace, trace
from modelcode.structure.tree import Tree, describe, dtype_name, shape_text

__all__ = ["Diagram", "Tree", "describe", "diagram", "draw", "empty_model", "trace_model"]


def trace_model(model: nn.Module, task: str | None = None) -> Trace:
    """Run the model once on its task's sample batch and record the calls."""
    t = samples.task(model, task)
    return trace(model, t.inputs(model.config, samples.device_of(model)), t.run)


def diagram(model: nn.Module, task: str | None = None, traced: Trace | None = None,
            title: str | None = None) -> Diagram:
    """The graph the picture draws: boxes, frames and arrows (see `graph.py`)."""
    return build(model, traced or trace_model(model, task), title or type(model).__name__)


def subtitle(model: nn.Module, tree: Tree) -> str:
    dtypes = sorted({dtype_name(p.dtype) for p in model.parameters()})
    ins = ", ".join(f"{k} {shape_text(s)}" for k, s in tree.inputs.items())
    text = f"{tree.total_params:,} parameters · {', '.join(dtypes)} · sample input: {ins}"
    if tree.kv_cache is not None:
        text += f" · KV cache {tree.kv_cache.bytes_per_token:,} bytes per {tree.kv_cache.per}"
    return text


def draw(model: nn.Module, *paths: str | Path, task: str | None = None, title: str | None = None,
         traced: Trace | None = None, tree: Tree | None = None) -> list[Path]:
    """Draw the architecture into each path (.svg, .png, .pdf: by suffix), under `title` (default: the model's
    class name). `traced` and `tree`, when the caller has them already, save running the sample again."""
    from modelcode.structure.picture import render, save

    if not paths:
        raise ValueError("draw(model, path, ...) needs at least one file to write, e.g. 'model.svg'")
    traced = traced or trace_model(model, task)
    tree = tree or describe(model, task, traced=traced)
    fig = render(diagram(model, traced=traced, title=title), subtitle(model, tree))
    return [save(fig, p) for p in paths]


def empty_model(path: str | Path | None = None, dtype: torch.dtype | str | None = None,
                preset: str | None = None) -> nn.Module:
    """The model of a checkpoint folder (or an embedded model's name, or a preset's name alone) built on the
    meta device from its config: every shape and dtype, no weights read. dtype: default the checkpoint's own."""
    from modelcode.api import not_found, resolve_path
    from modelcode.loading import build

    folder = None if path is None and preset is not None else resolve_path(path)
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(not_found(folder))
    return build(folder, preset, dtype).model
