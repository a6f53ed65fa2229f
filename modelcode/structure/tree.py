"""`describe(model)`: the module tree with each module's output shape on a sample batch, its parameter count
and dtype; identical consecutive blocks folded into one ("layers.0-21: TransformerBlock ×22"), and for
decoders the KV-cache bytes per token."""

from dataclasses import dataclass, field

import torch
from torch import nn

from modelcode.quantization.quantize import describe_scheme, parameter_count
from modelcode.structure import sample as samples
from modelcode.structure.modules import details, is_block_list, runs
from modelcode.structure.trace import Trace, trace

MAX_LABEL = 88  # characters of a tree line before a module's settings wrap
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8",
               torch.uint8: "uint8", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


@dataclass
class Node:
    name: str  # "tok_embeddings", "layers.0-21"
    kind: str  # the class name ("Embedding"), or "Parameter"
    details: str = ""  # "128×64", "n_heads=4 n_kv_heads=2 ..."
    output: str = ""  # output shape(s) on the sample batch; "-" if the sample never called it
    params: int = 0  # parameters counted here (a tied or shared one is counted where it first appears)
    dtypes: str = ""
    repeat: int = 1  # identical blocks folded into this node; its children are the first block's
    note: str = ""  # "weight tied to ...", "same module as ..."
    children: list["Node"] = field(default_factory=list)


@dataclass
class Tree:
    root: Node
    total_params: int  # == sum(p.numel() for p in model.parameters())
    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]
    kv_cache: samples.KVCacheSize | None = None
    depth: int | None = None  # levels below the model to print; None: all
    quantized: tuple[int, str] | None = None  # a quantized model's parameters unquantized, and its scheme in words

    def lines(self) -> list[str]:
        rows: list[tuple[str, str, str, str]] = [("module", "output", "params", "dtype")]

        def add(node: Node, prefix: str, branch: str, level: int):
            label = f"{node.name}: {node.kind}" if node.name else node.kind
            if node.repeat > 1:
                label += f" ×{node.repeat}"
            params = f"{node.params:,}" + (f" ({node.params // node.repeat:,} each)" if node.repeat > 1 else "")
            shown = node.children if self.depth is None or level < self.depth else []
            # Long settings (a rope scaling, say) wrap onto lines of their own under the module's name.
            label_lines = [branch + label]
            for word in " ".join(filter(None, [node.details, node.note and f"({node.note})"])).split(" "):
                if word and len(label_lines[-1]) + 1 + len(word) > MAX_LABEL and len(label_lines[-1]) > len(branch):
                    label_lines.append(prefix + ("│" if shown else " ") + "     " + word)
                elif word:
                    label_lines[-1] += " " + word
            rows.append((label_lines[0], node.output, params, node.dtypes))
            rows.extend((line, "", "", "") for line in label_lines[1:])
            for i, child in enumerate(shown):
                last = i == len(shown) - 1
                add(child, prefix + ("    " if last else "│   "), prefix + ("└── " if last else "├── "), level + 1)

        add(self.root, "", "", 0)
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        out = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in rows]
        ins = ", ".join(f"{k} {shape_text(s)}" for k, s in self.inputs.items())
        outs = ", ".join(f"{k} {shape_text(s)}" for k, s in self.outputs.items())
        total = f"total: {self.total_params:,} parameters"
        if self.quantized:
            n, scheme = self.quantized
            total = f"total: {n:,} parameters, quantized {scheme} ({self.total_params:,} stored values)"
        out.append(f"{total}; sample: {ins} -> {outs}")
        if self.kv_cache is not None:
            out.append(str(self.kv_cache))
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _outputs(trace: Trace, calls_by_module: dict[int, list], module: nn.Module) -> str:
    texts = []
    for call in calls_by_module.get(id(module), []):
        shapes = [shape_text(trace.values[v].shape) for v in call.outputs]
        text = f"{shapes[0]} ×{len(shapes)}" if len(shapes) > 1 and len(set(shapes)) == 1 else ", ".join(shapes)
        if text not in texts:
            texts.append(text)
    return " | ".join(texts) or "-"


def _build(model: nn.Module, trace: Trace) -> Node:
    owner = {id(p): name for name, p in model.named_parameters()}  # a tied parameter: its first name
    first_name = {id(m): name for name, m in reversed(list(model.named_modules(remove_duplicate=False)))}
    by_module: dict[int, list] = {}

    def index(call):
        for c in call.children:
            if c.module is not None:
                by_module.setdefault(id(c.module), []).append(c)
            index(c)

    index(trace.root)

    def build(name: str, m: nn.Module, full: str, skip: dict[str, frozenset[str]], rel: str) -> Node:
        n = Node(name, type(m).__name__, details(m, skip.get(rel, frozenset())), _outputs(trace, by_module, m))
        if first_name[id(m)] != full:  # a module shared by two parents is shown (and counted) once
            n.note = f"same module as {first_name[id(m)]}"
            n.output = "" if n.output == "-" else n.output
            return n
        dtypes = set()
        for pname, p in m.named_parameters(recurse=False):
            here = f"{full}.{pname}".lstrip(".")
            if owner[id(p)] == here:
                n.params += p.numel()
                dtypes.add(dtype_name(p.dtype))
                if len(list(m.children())):  # direct parameters of a container get their own row
                    n.children.append(Node(pname, "Parameter", shape_text(tuple(p.shape)), "", p.numel(),
                                           dtype_name(p.dtype)))
            else:
                n.note = ", ".join(filter(None, [n.note, f"{pname} tied to {owner[id(p)]}"]))
        for cname, child in m.named_children():
            cfull = f"{full}.{cname}".lstrip(".")
            crel = f"{rel}.{cname}".lstrip(".")
            if is_block_list(child):
                groups, skip_idx = runs(list(child))
                for start, stop in groups:
                    label = f"{cname}.{start}" if stop - start == 1 else f"{cname}.{start}-{stop - 1}"
                    first = build(label, child[start], f"{cfull}.{start}", skip_idx, "")
                    first.repeat = stop - start
                    for i in range(start + 1, stop):  # the others are built alike: count their parameters
                        first.params += sum(p.numel() for pn, p in child[i].named_parameters()
                                            if owner[id(p)] == f"{cfull}.{i}.{pn}")
                    n.children.append(first)
            else:
                n.children.append(build(cname, child, cfull, skip, crel))
        for c in n.children:
            if c.kind != "Parameter":
                n.params += c.params
            dtypes.update(filter(None, c.dtypes.split(", ")))
        n.dtypes = ", ".join(sorted(dtypes))
        return n

    root = build("", model, "", {}, "")
    root.details = ""  # the model's settings are its config, not a one-line summary
    return root


def describe(model: nn.Module, task: str | None = None, depth: int | None = None, kv_cache: bool = True,
             traced: Trace | None = None) -> Tree:
    """The model's structure as a tree (print it, or walk `tree.root`). The model runs once on a small
    sample batch for its task (from the registry, or `task=`: "causal-lm", "embedding",
    "image-classification", "translation"); on the meta device this is free.

    depth: levels below the model to print (None: all).
    """
    t = samples.task(model, task)
    inputs = t.inputs(model.config, samples.device_of(model))
    traced = traced or trace(model, inputs, t.run)
    root = _build(model, traced)
    root.output = ", ".join(shape_text(traced.values[v].shape) for v in traced.outputs.values())
    total = sum(p.numel() for p in model.parameters())
    if root.params != total:  # the tree counts each parameter once; anything else is a bug here
        raise AssertionError(f"the tree counts {root.params:,} parameters but the model has {total:,}")
    kv = t.kv_cache(model, inputs) if kv_cache and t.kv_cache is not None else None
    scheme = describe_scheme(model)
    return Tree(root, total, {k: tuple(v.shape) for k, v in inputs.items()},
                {k: traced.values[v].shape for k, v in traced.outputs.items()}, kv, depth,
                scheme and (parameter_count(model), scheme))
