"""From a trace to the graph a diagram draws: boxes for modules, small nodes for the torch functions that
matter at that level (the residual `+`, a `concat`, a `[:, 0]`), arrows for the data flow, and frames for
the parts that hold repeated blocks. Everything comes from the recorded run, nothing from model names:

- the model (and any encoder or decoder in it) is a *stack*: it is drawn open, its calls in a frame;
- the elements of an `nn.ModuleList` are *blocks*: one open frame per run of identical blocks, "×N",
  showing the first block's calls; anything inside a block is a box;
- a module called by a sibling's code (Marian's attention computing keys from `self.k_proj`) joins that
  sibling's box; reshapes and dtype casts are no nodes at all; values that depend on no input (position
  ids, masks) draw no arrows;
- a box's colour comes from what it computes: attention (scaled dot-product), embedding, norm,
  feed-forward (two or more matmuls), position tables (modules that read no input).
"""

from dataclasses import dataclass, field

from torch import nn

from modelcode.structure.modules import attributes, details, runs
from modelcode.structure.trace import Call, Trace
from modelcode.structure.tree import shape_text

# Functions that only reshape or cast: the arrow passes through them.
PASS_THROUGH = {"view", "reshape", "transpose", "permute", "flatten", "contiguous", "expand", "expand_as", "to",
                "float", "half", "bfloat16", "double", "type", "type_as", "unsqueeze", "squeeze", "clone", "detach",
                "T"}
# A module that only calls these (dropout, which does nothing at inference; nn.Identity) draws no box.
IDENTITY_OPS = PASS_THROUGH | {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d"}
# Functions whose result does not depend on the values they are given (position ids, zero token types).
FACTORIES = {"arange", "zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "empty_like",
             "new_zeros", "new_ones", "new_full", "new_empty", "tensor", "linspace"}
ACTIVATIONS = {"relu", "gelu", "silu", "tanh", "sigmoid", "softmax", "mish", "elu", "leaky_relu", "hardswish"}
ATTENTION_OPS = {"scaled_dot_product_attention", "softmax", "multi_head_attention_forward"}
NORM_OPS = {"layer_norm", "rms_norm", "group_norm", "batch_norm", "rsqrt"}
SYMBOLS = {"add": "+", "iadd": "+", "radd": "+", "sub": "−", "rsub": "−", "mul": "×", "rmul": "×", "imul": "×",
           "truediv": "÷", "div": "÷", "matmul": "@"}


@dataclass
class Node:
    id: int
    kind: str  # "input", "output", "module", "op", "param", "port", "frame"
    title: str = ""  # class name, op symbol, input name
    name: str = ""  # the module's name inside its frame
    detail: str = ""
    shape: str = ""
    category: str = ""  # colour: attention, mlp, norm, embedding, position, linear, activation, op, io, param
    params: int = 0  # a module's parameters (a tied one counts where it first appears); a frame's: per block
    graph: "Graph | None" = None  # a frame's contents
    repeat: int = 1


@dataclass
class Edge:
    src: int
    dst: int
    primary: bool = True  # the main data flow (decides the layout); secondary arrows are side inputs
    label: str = ""


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    in_port: int | None = None
    out_port: int | None = None


@dataclass
class Diagram:
    title: str
    root: Graph
    edges: list[Edge]
    nodes: dict[int, Node]


def _ops(call: Call) -> list[str]:
    out = []
    for c in call.children:
        out.extend(_ops(c) if c.is_module else [c.name])
    return out


def _category(call: Call, has_data_input: bool) -> str:
    ops = _ops(call)
    n_linear = ops.count("linear")
    if ATTENTION_OPS & set(ops):
        return "attention"
    if {"embedding", "conv1d", "conv2d", "conv3d"} & set(ops):
        return "embedding"
    if not has_data_input:
        return "position"
    if n_linear >= 2:
        return "mlp"
    if NORM_OPS & set(ops):
        return "norm"
    if n_linear == 1:
        return "linear"
    if ops and set(ops) <= ACTIVATIONS:
        return "activation"
    return "other"


def _index_text(index) -> str:
    def one(i):
        if isinstance(i, slice):
            return ":".join("" if b is None else str(b) for b in (i.start, i.stop))
        return "..." if i is Ellipsis else "None" if i is None else str(i)

    return "[" + ", ".join(map(one, index if isinstance(index, tuple) else (index,))) + "]"


class _Builder:
    def __init__(self, model: nn.Module, trace: Trace):
        self.model, self.trace = model, trace
        self.nodes: dict[int, Node] = {}
        self.edges: dict[tuple[int, int], Edge] = {}
        self.data: set[int] = set(trace.inputs.values()) | {v for v, val in trace.values.items() if val.param}
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.owner = {id(p): name for name, p in model.named_parameters()}  # a tied parameter: its first name
        self._runs: dict[str, tuple[list[tuple[int, int]], dict[str, frozenset[str]]]] = {}

    def runs(self, list_name: str) -> tuple[list[tuple[int, int]], dict[str, frozenset[str]]]:
        """The runs of identical blocks in a ModuleList, and the index attributes (see `modules.runs`)."""
        if list_name not in self._runs:
            self._runs[list_name] = runs(list(self.modules[list_name]))
        return self._runs[list_name]

    def own_params(self, module: nn.Module, name: str) -> int:
        return sum(p.numel() for n, p in module.named_parameters() if self.owner[id(p)] == f"{name}.{n}".lstrip("."))

    def box_detail(self, module: nn.Module, name: str, skip: frozenset[str]) -> str:
        """The module's settings, which of its linear layers have a bias, and which weights are tied."""
        parts = [details(module, skip)]
        if not isinstance(module, nn.Linear):
            linears = [(n, m.bias is not None) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            biased = [n for n, b in linears if b]
            if biased:
                parts.append("with biases" if len(biased) == len(linears) else "bias: " + ", ".join(biased))
        tied = [f"{p} = {self.owner[id(t)]}" for p, t in module.named_parameters()
                if self.owner[id(t)] != f"{name}.{p}".lstrip(".")]
        if tied:
            parts.append("tied: " + ", ".join(tied))
        return "\n".join(filter(None, parts))

    def node(self, into: Graph, **kw) -> Node:
        n = Node(id=len(self.nodes), **kw)
        self.nodes[n.id] = n
        into.nodes.append(n)
        return n

    def edge(self, src: int, dst: int, primary: bool = True, label: str = "") -> None:
        if src == dst:
            return
        e = self.edges.setdefault((src, dst), Edge(src, dst, primary, label))
        e.primary = e.primary or primary
        if label and label not in e.label.split(", "):
            e.label = ", ".join(filter(None, [e.label, label]))

    def shape(self, vid: int) -> str:
        return shape_text(self.trace.values[vid].shape)

    def items(self, call: Call) -> list[list[Call]]:
        """The level's children, with sub-calls merged into their owner's call and runs of identical
        blocks grouped: each item is a list of calls."""
        modules = [c for c in call.children if c.is_module]
        owner = {}
        for c in modules:
            prefixes = [d for d in modules if d is not c and c.name.startswith(d.name + ".")]
            if prefixes:
                owner[id(c)] = max(prefixes, key=lambda d: len(d.name))
        items: list[list[Call]] = []
        by_owner: dict[int, list[Call]] = {}
        for c in call.children:
            if c.is_module:
                root = c
                while id(root) in owner:
                    root = owner[id(root)]
                if id(root) in by_owner:
                    by_owner[id(root)].append(c)
                    continue
                by_owner[id(root)] = [c]
                items.append(by_owner[id(root)])
            else:
                items.append([c])
        grouped: list[list[Call]] = []
        for item in items:
            prev = grouped[-1][0] if grouped else None
            if prev is not None and len(item) == 1 and self.same_run(prev, item[0]):
                grouped[-1].append(item[0])  # one call per block: the block list's runs
            else:
                grouped.append(item)
        return grouped

    def block_of(self, call: Call) -> tuple[str, int] | None:
        """(list name, index) when the call is an element of a ModuleList."""
        parent, _, index = call.name.rpartition(".")
        if call.is_module and index.isdigit() and isinstance(self.modules.get(parent), nn.ModuleList):
            return parent, int(index)
        return None

    def same_run(self, first: Call, call: Call) -> bool:
        a, b = self.block_of(first), self.block_of(call)
        if a is None or b is None or a[0] != b[0]:
            return False
        return any(start <= a[1] and b[1] < stop for start, stop in self.runs(a[0])[0])

    def is_stack(self, call: Call) -> bool:
        return any(self.block_of(c) is not None for c in call.children)

    def level(self, call: Call, graph: Graph, producer: dict[int, int], labels: dict[int, str], prefix: str,
              skip: dict[str, frozenset[str]] | None = None) -> None:
        """Add the nodes and edges of `call`'s children to `graph`. `producer`: value id -> id of the node that
        produced it, as seen from this level (outer levels' nodes included); filled in as nodes are made.
        `labels`: side inputs of the frames around this level -> the argument name they came in as.
        `skip`: in a block, the attributes holding the block's index (by path in the block), not shown."""
        params: dict[int, int] = {}
        pending: list[tuple[int, list[Call], int | None]] = []  # (node, its calls, its primary input)
        for item in self.items(call):
            first = item[0]
            if not first.is_module:
                self.op(first, graph, producer, params, pending)
                continue
            block = self.block_of(first)
            name = first.name.removeprefix(prefix).lstrip(".")
            data_in = [v for v in first.inputs if v in self.data]
            if (len(item) == 1 and block is None and set(_ops(first)) <= IDENTITY_OPS and len(data_in) == 1
                    and len(first.outputs) == 1 and data_in[0] in producer):
                producer[first.outputs[0]] = producer[data_in[0]]
                self.data.add(first.outputs[0])
                continue
            if block is not None or self.is_stack(first):
                node = self.frame(item, graph, producer, labels, name, block is not None)
                outputs = item[-1].outputs
            else:
                owner = min(item, key=lambda c: len(c.name))  # the module whose sub-modules joined its box
                has_input = any(v in self.data for c in item for v in c.inputs)
                rel = owner.name.removeprefix(prefix).lstrip(".")
                node = self.node(graph, kind="module", title=type(owner.module).__name__, name=rel,
                                 detail=self.box_detail(owner.module, owner.name, (skip or {}).get(rel, frozenset())),
                                 shape=self.shape(owner.outputs[0]), category=_category(owner, has_input),
                                 params=self.own_params(owner.module, owner.name))
                pending.append((node.id, item, next((v for v in owner.inputs if v in self.data), None)))
                outputs = [v for c in item for v in c.outputs]
            for v in outputs:
                producer[v] = node.id
                self.data.add(v)
        # Edges last: a merged box's later calls read values made after its first call.
        for node_id, calls, primary in pending:
            for c in calls:
                for v in c.inputs:
                    src = producer.get(v, params.get(v))
                    if v not in self.data or src is None:
                        continue
                    side = primary is not None and v != primary
                    self.edge(src, node_id, not side, (labels.get(v) or c.arg_names.get(v, "")) if side else "")

    def param(self, v: int, graph: Graph, producer: dict[int, int], params: dict[int, int]) -> None:
        """A parameter used directly by the code of this level (ViT's class token) gets a node of its own."""
        value = self.trace.values[v]
        if value.param and v not in producer and v not in params:
            params[v] = self.node(graph, kind="param", title=value.param.rsplit(".", 1)[-1], detail="parameter",
                                  shape=shape_text(value.shape), category="param").id

    def op(self, c: Call, graph: Graph, producer: dict[int, int], params: dict[int, int], pending: list) -> None:
        data_in = [v for v in c.inputs if v in self.data]
        if not data_in or c.name in FACTORIES:
            return
        out = self.trace.values[c.outputs[0]]
        same_size = _numel(out.shape) == _numel(self.trace.values[data_in[0]].shape)
        scalars = [a for a in c.consts if isinstance(a, int | float) and not isinstance(a, bool)]
        identity = SYMBOLS.get(c.name) in ("×", "÷") and scalars == [1] and len(data_in) == 1  # x * 1.0
        if c.name in PASS_THROUGH or identity or (c.name == "getitem" and same_size):
            self.param(data_in[0], graph, producer, params)
            src = producer.get(data_in[0], params.get(data_in[0]))
            for v in c.outputs:
                self.data.add(v)
                if src is not None:
                    producer[v] = src
            return
        for v in data_in:
            self.param(v, graph, producer, params)
        if c.name in SYMBOLS:
            title = SYMBOLS[c.name] + (f" {scalars[0]:g}" if scalars else "")
        elif c.name == "getitem":
            title = _index_text(c.consts[0]) if c.consts else "[...]"
        else:
            title = {"cat": "concat"}.get(c.name, c.name)
        node = self.node(graph, kind="op", title=title, shape=shape_text(out.shape),
                         category="activation" if c.name in ACTIVATIONS else "op")
        pending.append((node.id, [c], None))
        for v in c.outputs:
            producer[v] = node.id
            self.data.add(v)

    def frame(self, item: list[Call], graph: Graph, producer: dict[int, int], labels: dict[int, str], name: str,
              is_block: bool) -> Node:
        first = item[0]
        if len(item) > 1:
            start, stop = self.block_of(item[0])[1], self.block_of(item[-1])[1]
            name = f"{name.rpartition('.')[0]}.{start}-{stop}"
        skip = self.runs(self.block_of(first)[0])[1] if is_block else {}
        detail = " ".join(f"{k}={v}" for k, v in attributes(first.module, skip.get("", frozenset())).items())
        inner = Graph()
        node = self.node(graph, kind="frame", title=type(first.module).__name__, name=name, detail=detail,
                         graph=inner, repeat=len(item), shape=self.shape(item[-1].outputs[0]),
                         params=self.own_params(first.module, first.name),
                         category="block" if is_block else "stack")
        data_in = [v for v in first.inputs if v in self.data]
        inner_producer = dict(producer)
        inner_labels = dict(labels)
        if data_in:
            src = producer.get(data_in[0])
            if src is not None:
                self.edge(src, node.id)
            inner.in_port = self.node(inner, kind="port").id
            inner_producer[data_in[0]] = inner.in_port
            for v in data_in[1:]:  # side inputs: arrows from outside go straight to their consumers inside
                inner_labels.setdefault(v, first.arg_names.get(v, ""))
        self.level(first, inner, inner_producer, inner_labels, first.name, skip)
        out = first.outputs[0]
        if out in inner_producer and inner_producer[out] != producer.get(out):
            inner.out_port = self.node(inner, kind="port").id
            self.edge(inner_producer[out], inner.out_port)
        return node


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def build(model: nn.Module, trace: Trace, title: str = "") -> Diagram:
    b = _Builder(model, trace)
    root = Graph()
    producer: dict[int, int] = {}
    for name, v in trace.inputs.items():
        producer[v] = b.node(root, kind="input", title=name, shape=b.shape(v), category="io").id
    b.level(trace.root, root, producer, {}, "")
    for name, v in trace.outputs.items():
        out = b.node(root, kind="output", title=name, shape=b.shape(v), category="io")
        if v in producer:
            b.edge(producer[v], out.id)
    return Diagram(title or type(model).__name__, root, list(b.edges.values()), b.nodes)
