"""`modelcode show`: a model's structure, as a text tree and as a diagram (SVG and PNG)."""

from pathlib import Path


def main(model: str | None = None, *, out: str | None = None, svg: str | None = None, png: str | None = None,
         depth: int | None = None, dtype: str | None = None, preset: str | None = None) -> None:
    """Show a model's structure: print its module tree and draw its architecture (SVG and PNG).

    The tree gives each module's output shape on a sample batch, its parameter count and dtype, and for
    decoders the KV-cache bytes per token; runs of identical blocks are folded into one. Only config.json
    is read: the model is built on the meta device, so even a 70B checkpoint shows in seconds, with no
    memory used and no weights read.

    Args:
        model: checkpoint folder, or an embedded model's name (default: the embedded TinyStories-656K, or
            with --preset alone, that preset's shape).
        out: folder for the two images, named after the model folder (default: the current directory).
        svg: write the SVG to this file (with --svg or --png, only the files named are written).
        png: write the PNG to this file.
        depth: levels of the tree to print below the model (default: all).
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own).
        preset: the exact name of a known shape (llama-3-8b, mistral-7b, ...): alone, it needs no folder.
    """
    from modelcode.api import resolve_path
    from modelcode.structure import describe, draw, empty_model, trace_model

    if out is not None and (svg or png):
        raise ValueError("use either --out DIR (both images, named after the model) or --svg FILE / --png FILE")
    if depth is not None and depth < 0:
        raise ValueError(f"--depth must be 0 or more (levels below the model), got {depth}")
    m = empty_model(model, dtype=dtype, preset=preset)
    name = preset if preset and model is None else resolve_path(model).resolve().name
    files = [Path(f) for f in (svg, png) if f] or [Path(out or ".") / f"{name}.{ext}" for ext in ("svg", "png")]
    traced = trace_model(m)
    tree = describe(m, depth=depth, traced=traced)
    print(tree)
    for path in draw(m, *files, title=f"{name}  ·  {type(m).__name__}", traced=traced, tree=tree):
        print(f"wrote {path}")
