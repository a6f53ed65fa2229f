"""Splitting a model across ranks, from outside it (Megatron-LM's scheme, as in gpt-fast's `tp.py`).

Each architecture has a `Plan`: which of its layers are split by output (column-wise: q, k, v, the MLP's gate
and up, so each rank computes its own heads and hidden units), which by input (row-wise: the attention output
and the MLP's down projection, whose partial outputs an all-reduce sums), and which by vocabulary (embedding and
output head, whose logits an all-gather joins). A rank keeps 1/tp of every split layer and a copy of the rest
(norms, rotary tables), so its memory is about 1/tp of the model's.

One rule says which dim of a tensor a rank slices, whatever the layer's kind (float, int8, int4):
- split by output or by vocabulary: dim 0 of every tensor (weight rows, bias, and a quantized layer's scales and
  zeros, which have one row per output);
- split by input: dim 1 of the 2-d tensors (weight columns; int4's scales and zeros, one column per group of
  inputs); 1-d tensors stay whole (int8's per-row scales: each partial sum is scaled by the same row scale;
  the bias: added once, after the all-reduce).

The same slices are read straight from the checkpoint by `TensorParallel.shard_stored`, so a rank never holds
more than its own share (safetensors' `get_slice` on the memory-mapped file).
"""

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch

from torch import nn
from torch.distributed import ProcessGroup

from modelcode.loading.checkpoint import StoredTensor
from modelcode.loading.weight_maps import compile_map, lookup
from modelcode.models.gpt_neox import GPTNeoX
from modelcode.models.llama import Llama
from modelcode.parallel.layers import GatheredHead, RowParallel, VocabParallelEmbedding
from modelcode.swap import replace_module


@dataclass(frozen=True)
class Plan:
    column: tuple[str, ...]  # module name patterns (fnmatch), split by output
    row: tuple[str, ...]  # split by input, then all-reduced
    embedding: str
    head: str
    attention: str  # the attention modules, whose head counts become this rank's
    widths: Callable[[object], dict[str, int]]  # what must divide by tp: {"attention heads": 32, ...}
    local_config: Callable[[object, int], object]  # the config of one rank's shard (what its KV cache holds)


def _llama_widths(c) -> dict[str, int]:
    return {"attention heads": c.n_heads, "key/value heads": c.n_kv_heads, "feed-forward width": c.hidden_dim}


def _neox_widths(c) -> dict[str, int]:
    return {"attention heads": c.n_heads, "MLP width": c.hidden_dim}


PLANS: dict[type, Plan] = {
    Llama: Plan(column=("layers.*.attention.wq", "layers.*.attention.wk", "layers.*.attention.wv",
                        "layers.*.feed_forward.w1", "layers.*.feed_forward.w3"),
                row=("layers.*.attention.wo", "layers.*.feed_forward.w2"),
                embedding="tok_embeddings", head="output", attention="layers.*.attention",
                widths=_llama_widths,
                local_config=lambda c, tp: dataclasses.replace(c, n_heads=c.n_heads // tp,
                                                               n_kv_heads=c.n_kv_heads // tp)),
    # GPT-NeoX's head_dim is derived (dim // n_heads): a rank's config keeps it by dividing both.
    GPTNeoX: Plan(column=("layers.*.attention.query", "layers.*.attention.key", "layers.*.attention.value",
                          "layers.*.mlp.dense_h_to_4h"),
                  row=("layers.*.attention.dense", "layers.*.mlp.dense_4h_to_h"),
                  embedding="embed_in", head="embed_out", attention="layers.*.attention",
                  widths=_neox_widths,
                  local_config=lambda c, tp: dataclasses.replace(c, n_heads=c.n_heads // tp, dim=c.dim // tp)),
}


def plan_of(model: nn.Module) -> Plan:
    plan = PLANS.get(type(model))
    if plan is None:
        raise ValueError(f"tensor parallelism has no plan for {type(model).__name__}: it splits "
                         f"{', '.join(t.__name__ for t in PLANS)} models; run this one with tp=1")
    return plan


@dataclass
class TensorParallel:
    """One rank's view of a tensor-parallel run: which share it holds and the group it talks to."""

    rank: int
    world: int
    group: ProcessGroup | None = None

    def check(self, model: nn.Module, config) -> Plan:
        """The model's plan; a ValueError naming the width that tp does not divide."""
        plan = plan_of(model)
        for what, n in plan.widths(config).items():
            if n % self.world:
                fits = [d for d in range(1, n + 1) if all(w % d == 0 for w in plan.widths(config).values())]
                raise ValueError(f"tp={self.world} does not divide the model's {n} {what}: use a tp that divides "
                                 f"{', '.join(f'{w} {k}' for k, w in plan.widths(config).items())} "
                                 f"({', '.join(map(str, fits))})")
        return plan

    def split_dims(self, model: nn.Module, config) -> dict[str, int | None]:
        """{parameter name: the dim this rank slices, or None where it keeps the whole tensor}."""
        plan = self.check(model, config)
        vocab_split = config.vocab_size % self.world == 0  # otherwise embedding and head stay whole on every rank
        dims = {}
        for name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if any(fnmatch(name, pattern) for pattern in plan.column):
                    dims[f"{name}.{pname}"] = 0
                elif any(fnmatch(name, pattern) for pattern in plan.row):
                    dims[f"{name}.{pname}"] = 1 if p.dim() > 1 else None
                elif name in (plan.embedding, plan.head) and vocab_split:
                    dims[f"{name}.{pname}"] = 0
        return dims

    def span(self, size: int) -> tuple[int, int]:
        """This rank's rows [start, stop) of a dim of `size`."""
        share = size // self.world
        return self.rank * share, (self.rank + 1) * share

    def shard(self, model: nn.Module, config) -> object:
        """Keep only this rank's slice of every split tensor, in place (on the meta device: only the shapes);
        returns the config of this rank's shard, which the model now carries as `model.config`."""
        plan = self.check(model, config)
        dims = self.split_dims(model, config)
        done: dict[int, nn.Parameter] = {}  # tied weights (the head's, the embedding's) stay one Parameter
        for name, module in list(model.named_modules()):
            for pname, p in list(module.named_parameters(recurse=False)):
                dim = dims.get(f"{name}.{pname}")
                if dim is None:
                    continue
                if id(p) not in done:
                    start, stop = self.span(p.shape[dim])
                    done[id(p)] = nn.Parameter(p.detach().narrow(dim, start, stop - start).clone(), requires_grad=False)
                setattr(module, pname, done[id(p)])
            _set_sizes(module, name, dims.get(f"{name}.weight"), self.world)
        for name, module in model.named_modules():
            if fnmatch(name, plan.attention):
                for attr in ("n_heads", "n_kv_heads"):
                    if hasattr(module, attr):
                        setattr(module, attr, getattr(module, attr) // self.world)
        model.config = plan.local_config(config, self.world)
        return model.config

    def shard_stored(self, stored: list[StoredTensor], weight_map: dict, dims: dict[str, int | None]
                     ) -> Iterator[StoredTensor]:
        """The checkpoint's tensors as this rank's slices: each read only in part (`dims` from `split_dims`, in
        our parameter names, which the weight map maps the checkpoint's names to)."""
        compiled = compile_map(weight_map)
        for st in stored:
            found = lookup(compiled, st.name)
            split = {dims.get(t) for t in found[0]} - {None} if found else set()
            if not split:
                yield st
                continue
            (dim,) = split  # a fused tensor (GPT-NeoX's query_key_value) splits along its targets' one dim
            start, stop = self.span(st.shape[dim])
            shape = st.shape[:dim] + (stop - start,) + st.shape[dim + 1:]
            yield StoredTensor(st.name, st.file, shape, lambda st=st, d=dim, a=start, b=stop: st.part(d, a, b))

    def connect(self, model: nn.Module) -> nn.Module:
        """Wrap the layers that need their outputs joined across ranks (after loading: wrapping renames them)."""
        plan = plan_of(model)
        for name, module in list(model.named_modules()):
            if any(fnmatch(name, pattern) for pattern in plan.row):
                replace_module(model, name, RowParallel(module, self.group))
        embedding, head = model.get_submodule(plan.embedding), model.get_submodule(plan.head)
        if embedding.num_embeddings < model.config.vocab_size:
            start, _ = self.span(model.config.vocab_size)
            replace_module(model, plan.embedding, VocabParallelEmbedding(embedding, start, self.group))
            replace_module(model, plan.head, GatheredHead(head, self.group))
        return model


def _set_sizes(module: nn.Module, name: str, dim: int | None, world: int) -> None:
    """A sliced layer's size attributes follow its weight's slice."""
    if dim is None:
        return
    if isinstance(module, nn.Embedding):
        module.num_embeddings //= world
    elif dim == 0:
        module.out_features //= world
    else:
        group = getattr(module, "group_size", None)  # int4: a rank's inputs must be whole groups
        if group and (module.in_features // world) % group:
            raise ValueError(f"tp={world} splits the {module.in_features} inputs of int4 layer {name!r} into "
                             f"{module.in_features // world}, not a multiple of its group size {group}: use a "
                             "smaller tp, or quantize with a group size that divides them")
        module.in_features //= world
