"""Load a model from a checkpoint folder: build it on the meta device from its config (`build.py`), then
stream each stored tensor through the architecture's weight map into place, converted to the dtype and
device asked for. Strict: unknown, missing or mis-shaped tensors are errors that name the tensor, the
file and what was expected."""

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from modelcode import quantization
from modelcode.errors import ArgumentError, CheckpointError
from modelcode.loading import registry
from modelcode.loading.build import build
from modelcode.loading.checkpoint import StoredTensor, read_tensors, weight_files
from modelcode.loading.weight_maps import compile_map, lookup
from modelcode.loading.weight_maps.llama import merge_meta_shards


def resolve_device(device: str | torch.device) -> torch.device:
    """The device asked for, if this machine has it."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ArgumentError("device", f"{device!r} is not a device: use cpu, cuda, cuda:1, mps, ... ({e})") from e
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps}.get(device.type)
    if backend is not None and not backend.is_available():
        raise ArgumentError("device", f"is {device}, but this machine (torch {torch.__version__}) has no "
                            f"{device.type.upper()} device: use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ArgumentError("device", f"is {device}, but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s): use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def load_model(folder: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               preset: str | None = None, shard=None) -> tuple[nn.Module, object, registry.Architecture]:
    """shard: a `parallel.TensorParallel`: build and read only this rank's share of the model."""
    device = resolve_device(device)
    built = build(folder, preset, dtype)
    stored = read_tensors(weight_files(Path(folder)))
    if built.arch is registry.META_LLAMA:
        stored = _merge_meta_shards(stored, built.config)
    config = built.config
    if shard is not None:
        dims = shard.split_dims(built.model, config)
        stored, config = shard.shard_stored(stored, built.weight_map, dims), shard.shard(built.model, config)
    state = _map_state(stored, built.weight_map, config, built.model)
    _assign(built.model, state, built.dtype, device)
    if built.quantized:
        quantization.pack_layers(built.model)  # int4: the kernel layout of this device
    if shard is not None:
        shard.connect(built.model)
    return built.model, config, built.arch


def _merge_meta_shards(stored: list[StoredTensor], config) -> list[StoredTensor]:
    """Join Meta's model-parallel shards."""
    by_name: dict[str, list[StoredTensor]] = {}
    for t in stored:
        by_name.setdefault(t.name, []).append(t)
    merged = []
    for name, parts in by_name.items():
        if len(parts) == 1:
            merged.append(parts[0])
            continue
        t = merge_meta_shards(name, [p.read() for p in parts], config.vocab_size)
        merged.append(StoredTensor(name, parts[0].file, tuple(t.shape), lambda t=t: t))
    return merged


def _map_state(stored: list[StoredTensor], weight_map: dict, config, model: nn.Module) -> dict:
    """Checkpoint tensors -> {our canonical parameter name: tensor}, checked name by name."""
    compiled = compile_map(weight_map)
    canonical = _canonical_names(model)
    expected = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for st in tqdm(stored, desc="loading weights", unit="tensor", delay=2.0, leave=False):
        rule = lookup(compiled, st.name)
        if rule is None:
            raise CheckpointError(f"unknown tensor {st.name!r} in {st.file.name}: no rule in the weight map; "
                                  "is config.json's model_type right for these weights?")
        targets, transform, is_optional = rule
        if is_optional and not all(t in canonical for t in targets):
            continue  # a head this config does not build
        values = _read(st, transform, config, len(targets))
        for ours, value in zip(targets, values, strict=True):
            if ours not in canonical:
                raise CheckpointError(f"tensor {st.name!r} in {st.file.name} maps to {ours!r}, which this "
                                      f"model does not have (check config.json, e.g. bias flags)")
            name = canonical[ours]
            if tuple(value.shape) != tuple(expected[name].shape):
                raise CheckpointError(f"tensor {st.name!r} in {st.file.name} has shape {tuple(value.shape)}, "
                                      f"but {ours!r} expects {tuple(expected[name].shape)} from the config")
            state.setdefault(name, value)  # tied weights may be stored twice
    missing = sorted(set(expected) - set(state))
    if missing:
        hints = {ours: hf for hf, ours in weight_map.items() if isinstance(ours, str)}
        named = ", ".join(f"{m!r} (stored as {hints.get(_pattern(m), '?')!r})" for m in missing[:5])
        raise CheckpointError(f"{len(missing)} weight(s) missing from the checkpoint: {named}"
                              + (" ..." if len(missing) > 5 else "")
                              + "; if the output layer is tied to the embedding, set tie_word_embeddings")
    return state


def _read(st: StoredTensor, transform, config, n_targets: int) -> list:
    """The tensor(s) one stored tensor becomes. Plain renames stay unread (only the shape is checked)."""
    if n_targets == 0:
        return []
    if transform is None:
        return [st]
    out = transform(st.read(), config)
    return list(out) if isinstance(out, tuple) else [out]


def _pattern(name: str) -> str:
    return ".".join("{}" if part.isdigit() else part for part in name.split("."))


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name -> the first name of the same Parameter (tied weights share one)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


def _assign(model: nn.Module, state: dict, dtype: torch.dtype, device: torch.device) -> None:
    """Put the loaded tensors in place of the meta parameters, keeping tied parameters tied."""
    canonical = _canonical_names(model)
    params = {name: nn.Parameter(_convert(t, dtype, device), requires_grad=False) for name, t in state.items()}
    for name, canon in canonical.items():
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, params[canon])
    with torch.device(device):
        for m in model.modules():
            if hasattr(m, "reset_buffers"):
                m.reset_buffers()


def _convert(t: "torch.Tensor | StoredTensor", dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = t.read() if isinstance(t, StoredTensor) else t
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
