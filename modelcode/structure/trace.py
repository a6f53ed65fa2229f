"""Record what a model does on one sample batch: which modules it calls, in what order, and which tensor
flows from where to where.

Two hooks do it, with no change to the model: forward hooks on every module mark where a module's call
begins and ends, and a `TorchFunctionMode` sees every torch function called in between (`x + h`,
`torch.cat`, `F.linear`...). Each tensor gets an id when it first appears, so a call's inputs can be
traced back to the call that produced them. The result is a tree of calls, the way the forward code
nests them: the model's children, each block's children, down to the torch functions. Unlike
`torch.fx` this just runs the code, so any Python control flow works, and on the meta device it
costs no memory and almost no time.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class Value:
    """A tensor seen during the run."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    param: str | None = None  # the parameter's name, when the tensor is one


@dataclass
class Call:
    """One event: a module's forward (`module` set) or a torch function called directly by the code of the
    enclosing call (`module` None)."""

    name: str  # module: its qualified name in the model ("layers.0.attention"); torch function: "add", "cat"...
    module: nn.Module | None = None
    inputs: list[int] = field(default_factory=list)  # ids of the tensors read, in argument order
    outputs: list[int] = field(default_factory=list)  # ids of the tensors returned
    arg_names: dict[int, str] = field(default_factory=dict)  # module: tensor id -> forward() parameter name
    consts: tuple = ()  # torch function: its non-tensor arguments (a scalar factor, an index)
    children: list["Call"] = field(default_factory=list)

    @property
    def is_module(self) -> bool:
        return self.module is not None


@dataclass
class Trace:
    """The calls of one run. `root` stands for the model: its children are the calls the model's forward
    made (and those of any further method the run called, such as BERT's `pooled`)."""

    root: Call
    values: dict[int, Value]
    inputs: dict[str, int]  # sample input name -> tensor id
    outputs: dict[str, int]  # run output name -> tensor id

    def calls_of(self, module: nn.Module) -> list[Call]:
        """Every call of `module`, in order."""
        found = []

        def walk(call: Call):
            for c in call.children:
                if c.module is module:
                    found.append(c)
                walk(c)

        walk(self.root)
        return found


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.ids = WeakIdKeyDictionary()  # tensor -> id, without keeping dead tensors alive
        self.values: dict[int, Value] = {}
        self.params = {id(p): name for name, p in model.named_parameters()}
        self.root = Call(name="", module=model)
        self.stack = [self.root]
        self._names: dict[int, dict[int, str]] = {}  # id(parent module) -> {id(descendant): relative name}

    def vid(self, t: torch.Tensor) -> int:
        if t not in self.ids:
            self.ids[t] = len(self.values)
            self.values[len(self.values)] = Value(tuple(t.shape), t.dtype, self.params.get(id(t)))
        return self.ids[t]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = _tensors(out)
        if outs:  # `.shape`, `.dim()` and the like return no tensor: nothing flows
            self.stack[-1].children.append(Call(
                name=getattr(func, "__name__", str(func)).strip("_"),
                inputs=[self.vid(t) for t in _tensors((args, kwargs))],
                outputs=[self.vid(t) for t in outs],
                consts=tuple(a for a in args if not isinstance(a, torch.Tensor))))
        return out

    def module_name(self, module: nn.Module) -> str:
        """The name `module` has from where it is called, so that a module shared by two parents (Marian's
        one embedding for encoder and decoder) is named after the parent calling it."""
        for parent in reversed(self.stack):
            if parent.module is None:
                continue
            if id(parent.module) not in self._names:
                self._names[id(parent.module)] = {id(m): n for n, m in
                                                  reversed(list(parent.module.named_modules(remove_duplicate=False)))}
            rel = self._names[id(parent.module)].get(id(module))
            if rel is not None:
                return f"{parent.name}.{rel}".strip(".") if rel else parent.name
        return type(module).__name__

    def pre_hook(self, module, args, kwargs):
        call = Call(name=self.module_name(module), module=module)
        try:
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        except TypeError:
            bound = {f"arg{i}": a for i, a in enumerate(args)} | kwargs
        for arg, value in bound.items():
            for t in _tensors(value):
                call.inputs.append(self.vid(t))
                call.arg_names.setdefault(self.vid(t), arg)
        self.stack[-1].children.append(call)
        self.stack.append(call)

    def post_hook(self, module, args, kwargs, output):
        call = self.stack.pop()
        call.outputs = [self.vid(t) for t in _tensors(output)]


def trace(model: nn.Module, inputs: dict[str, torch.Tensor],
          run: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Trace:
    """Run `run(model, inputs)` (which returns named outputs) under the recorder."""
    rec = _Recorder(model)
    handles = [h for m in model.modules() for h in (
        m.register_forward_pre_hook(rec.pre_hook, with_kwargs=True),
        m.register_forward_hook(rec.post_hook, with_kwargs=True))]
    input_ids = {name: rec.vid(t) for name, t in inputs.items()}
    try:
        with torch.no_grad(), rec:
            outputs = run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    # A call of the model itself (its forward) is the root: splice its children in.
    children = []
    for c in rec.root.children:
        children.extend(c.children if c.module is model else [c])
    rec.root.children = children
    output_ids = {name: rec.vid(t) for name, t in outputs.items()}
    return Trace(rec.root, rec.values, input_ids, output_ids)
