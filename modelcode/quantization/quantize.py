"""Quantize a built model from outside, by swapping its `nn.Linear` modules, and write/read the result as a
checkpoint folder that `modelcode.load` opens with no flag.

On disk a quantized folder is the source folder's config and tokenizer files plus one `model.safetensors`
holding the portable form of every layer under modelcode's own parameter names (the architecture's weight
map has already been applied, so the loader maps names one to one). A quantized layer `x` stores
`x.weight` (int8, or uint8 with two 4-bit codes per byte), `x.scales` and, for int4, `x.zeros`; which
layers are quantized is read from those names. The scheme is recorded in the safetensors header
(`__metadata__["modelcode.quantization"]`, JSON such as `{"mode": "int4", "group_size": 32, "head": "int8"}`:
int4 layers, and an output head in int8): it describes the tensors, so it travels with them, and config.json
stays the source's own (transformers would misread a `quantization_config` it does not know).
"""

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from modelcode.quantization.linear import (
    INT4_GROUP_SIZES,
    Int4Linear,
    Int8Linear,
    PackedInt4Linear,
    PackedInt8Linear,
)
from modelcode.swap import embedding_weights, replace_module

MODES = ("int8", "int4")
QUANTIZED = (Int8Linear, PackedInt8Linear, Int4Linear, PackedInt4Linear)  # the layers `quantize` puts in
METADATA_KEY = "modelcode.quantization"
WEIGHTS = "model.safetensors"
# Files that hold weights in a source folder: never copied next to the quantized weights.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pth", "*.pt")


@dataclass(frozen=True)
class Scheme:
    mode: str  # "int8": one scale per output row; "int4": a scale and a zero per group of inputs
    group_size: int | None = None  # int4 only: inputs per group
    head: str | None = None  # int4 only: "int8" where the output head is in int8 (int4's default, see quantize)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.mode == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size {self.group_size} is not supported: use one of "
                             f"{', '.join(map(str, INT4_GROUP_SIZES))}")
        if self.mode == "int8" and self.group_size is not None:
            raise ValueError("int8 quantization has one scale per output row: group_size applies to int4 only")
        if self.head not in (None, "int8") or (self.head and self.mode != "int4"):
            raise ValueError(f"head={self.head!r}: the only head of its own mode is 'int8', under int4 layers "
                             "(otherwise a quantized head follows the scheme's mode)")

    def of_layer(self, is_head: bool) -> "Scheme":
        """The scheme of one layer: the head's own where it has one."""
        return Scheme("int8") if is_head and self.head == "int8" else Scheme(self.mode, self.group_size)

    def new_layer(self, linear: nn.Linear) -> nn.Module:
        """The quantized twin of a Linear (empty: on the meta device it is only shapes)."""
        dtype, bias = linear.weight.dtype, linear.bias is not None
        if self.mode == "int8":
            return Int8Linear(linear.in_features, linear.out_features, bias, dtype)
        return Int4Linear(linear.in_features, linear.out_features, bias, self.group_size, dtype)

    def quantize_layer(self, linear: nn.Linear) -> nn.Module:
        if self.mode == "int8":
            return Int8Linear.from_linear(linear)
        return Int4Linear.from_linear(linear, self.group_size)


def output_heads(model: nn.Module) -> set[str]:
    """The Linear layers, quantized or not, that produce the logits: those as wide as the vocabulary."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return {name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, *QUANTIZED)) and m.out_features == vocab}


def quantize(model: nn.Module, mode: str, group_size: int | None = 32, pack: bool = True,
             head: bool | None = None) -> nn.Module:
    """Replace every `nn.Linear` of `model` by its int8 or int4 version, in place; the output head by default
    in int8 (`head=None`), in the layers' mode (`head=True`) or not at all (`head=False`).

    Embeddings stay as they are (a lookup reads one row per token; quantizing them saves memory but no
    time). The output head's errors reach the logits undamped, so llama.cpp keeps its 4-bit formats' head at
    6 bits or more; here it is int8, whatever the mode: under int4 layers it costs no more perplexity than a
    float head (an int4 head adds ~2 points of %; see BENCHMARKS.md), and it is a large part of what a step
    reads (a 32k-vocabulary head: 18% of a 1B int4 model's bytes). A head tied to the embeddings is the
    embedding matrix itself, so a quantized copy would add memory rather than save it: it always stays.
    group_size is for int4 (ignored for int8). pack=False keeps the portable `Int8Linear` / `Int4Linear` form,
    which is what `save_quantized` writes; pack=True makes the layers fast on their current device.
    """
    already = describe_scheme(model)
    if already:
        raise ValueError(f"this model is already quantized ({already}): quantizing again "
                         "would lose precision and change nothing else; quantize the original checkpoint instead")
    layers = Scheme(mode, group_size if mode == "int4" else None)
    scheme = replace(layers, head="int8") if head is None and mode == "int4" else layers
    embeddings = embedding_weights(model)
    heads = output_heads(model)
    skip = {name for name in heads if head is False or id(model.get_submodule(name).weight) in embeddings}
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip]
    for name, m in tqdm(linears, desc=f"quantizing to {mode}", unit="layer", delay=2.0, leave=False):
        replace_module(model, name, scheme.of_layer(name in heads).quantize_layer(m))
    return pack_layers(model) if pack else model


def pack_layers(model: nn.Module) -> nn.Module:
    """Swap each portable `Int8Linear` and `Int4Linear` for the packed kernel module of its device (where
    there is one), in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Int8Linear | Int4Linear):
            packed = m.pack()
            if packed is not m:
                replace_module(model, name, packed)
    return model


def layer_scheme(layer: nn.Module) -> Scheme | None:
    """The scheme of one layer; None for a layer that is not quantized."""
    if isinstance(layer, Int8Linear | PackedInt8Linear):
        return Scheme("int8")
    return Scheme("int4", layer.group_size) if isinstance(layer, Int4Linear | PackedInt4Linear) else None


def scheme_of(model: nn.Module) -> Scheme:
    """The one scheme a model's quantized layers follow (an int8 head under int4 layers included)."""
    heads = output_heads(model)
    found = {layer_scheme(m) for name, m in model.named_modules() if name not in heads} - {None}
    head = _head_schemes(model)
    if len(found) == 1 and head == {Scheme("int8")} and next(iter(found)).mode == "int4":
        return replace(found.pop(), head="int8")
    found |= head
    if len(found) != 1:
        raise ValueError(f"expected a model quantized with one scheme, found {len(found)}: "
                         + (", ".join(map(str, found)) if found else "quantize it first with quantize(model, mode)"))
    return found.pop()


def parameter_count(model: nn.Module) -> int:
    """Parameters as the model has them unquantized: a quantized layer counts in x out weights (and its bias),
    not its codes, scales and zeros."""
    quantized = {name: m for name, m in model.named_modules() if layer_scheme(m) is not None}
    plain = sum(p.numel() for name, p in model.named_parameters() if name.rpartition(".")[0] not in quantized)
    return plain + sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
                       for m in quantized.values())


def describe_scheme(model: nn.Module) -> str | None:
    """The quantization of a model in words ("int4, group size 32, int8 head"), None when it has none."""
    if not {layer_scheme(m) for m in model.modules()} - {None}:
        return None
    s = scheme_of(model)
    return s.mode + (f", group size {s.group_size}" if s.group_size else "") + (f", {s.head} head" if s.head else "")


def _head_schemes(model: nn.Module) -> set[Scheme]:
    return {layer_scheme(model.get_submodule(name)) for name in output_heads(model)} - {None}


def head_mode(model: nn.Module) -> str | None:
    """How the model's output head is stored: "int8", "int4", or None where it is not quantized."""
    schemes = _head_schemes(model)
    return schemes.pop().mode if schemes else None


def save_quantized(model: nn.Module, source: str | Path, out: str | Path) -> Path:
    """Write a model quantized with `quantize(..., pack=False)` as a checkpoint folder: the portable tensors
    and scheme in `out/model.safetensors`, every other file of the source folder copied as it is."""
    source, out = Path(source), Path(out)
    if any(isinstance(m, PackedInt8Linear | PackedInt4Linear) for m in model.modules()):
        raise ValueError("this model's layers are packed for one device, a layout that must not be saved: "
                         "quantize with pack=False, save, then pack")
    if out.resolve() == source.resolve():
        raise ValueError(f"the output folder is the source folder {source}: choose another, the source "
                         "weights would be overwritten")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"the output folder {out} is not empty: choose a new folder (files left from another "
                         "checkpoint would be loaded along with this one)")
    scheme = scheme_of(model)
    # Written next to `out` and renamed when complete: an interrupted run leaves no half folder behind.
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        copy_non_weight_files(source, partial)
        tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}  # tied: once
        save_file(tensors, partial / WEIGHTS, metadata={"format": "pt", METADATA_KEY: json.dumps(asdict(scheme))})
        partial.replace(out)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def copy_non_weight_files(source: Path, out: Path) -> None:
    """Config, tokenizer, generation config, README, license...: every top-level file but the weights.
    Subfolders are left out (hub repos keep other formats of the weights there, such as `original/`)."""
    weights = {p for pattern in WEIGHT_PATTERNS for p in source.glob(pattern)}
    for f in sorted(source.iterdir()):
        if f.is_file() and f not in weights:
            shutil.copy2(f, out / f.name)


def read_quantized(folder: str | Path) -> tuple[Scheme, list[str]] | None:
    """The scheme and the quantized layers of a folder written by `save_quantized`; None for any other."""
    file = Path(folder) / WEIGHTS
    if not file.exists():
        return None
    try:
        with safe_open(file, framework="pt") as f:
            meta = (f.metadata() or {}).get(METADATA_KEY)
            names = list(f.keys())
    except (SafetensorError, OSError):
        return None  # not ours to judge: reading the weights reports what is wrong with the file
    if meta is None:
        return None
    try:
        scheme = Scheme(**json.loads(meta))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: unreadable quantization scheme {meta!r} in its metadata: {e}") from e
    return scheme, [n.removesuffix(".scales") for n in names if n.endswith(".scales")]


def prepare_to_load(model: nn.Module, scheme: Scheme, layers: list[str]) -> dict[str, str]:
    """For the loader: swap the named Linear layers of a (meta) model for empty quantized ones, and return
    the weight map of a quantized folder, which stores our own parameter names."""
    heads = output_heads(model)
    for name in layers:
        linear = model.get_submodule(name) if _has_module(model, name) else None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{WEIGHTS} has quantized tensors for {name!r}, which is not a Linear layer of "
                             f"{type(model).__name__}; was the folder's config.json changed after quantizing?")
        replace_module(model, name, scheme.of_layer(name in heads).new_layer(linear))
    return {name: name for name, _ in model.named_parameters()}


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
