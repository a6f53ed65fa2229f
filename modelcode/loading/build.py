"""The one model builder: a checkpoint folder or a preset's name -> its architecture, its config and the
model built on the meta device (every shape and dtype, no memory, no random init). The loader fills it with
the checkpoint's tensors, `show` looks at it as it is, and `bench` fills it with random weights."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modelcode import quantization
from modelcode.errors import CheckpointError
from modelcode.loading import registry
from modelcode.loading.checkpoint import read_tensors, weight_files

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


@dataclass
class Built:
    model: nn.Module  # on the meta device
    config: object
    arch: registry.Architecture
    dtype: torch.dtype  # what its floating-point tensors are to be
    weight_map: dict  # checkpoint names -> the model's (for a quantized folder: its own names, one to one)
    quantized: bool = False  # a folder written by `modelcode quantize`: its quantized layers are in place


def resolve_dtype(dtype: torch.dtype | str | None, default: str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or default or "float32"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint's file; a broken file is an error that names it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): fetch the file again") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object: fetch the file again")
    return value


def read_config(folder: Path, preset: str | None = None) -> tuple[registry.Architecture, object]:
    """The architecture and config of a folder: `config.json` (Hugging Face) or `params.json` (Meta)."""
    if preset is not None:
        return registry.preset(preset)
    if (folder / "config.json").exists():
        hf = read_json(folder / "config.json")
        arch = registry.architecture(hf.get("model_type"))
        return arch, _config(arch, hf, folder / "config.json")
    if (folder / "params.json").exists():
        return registry.META_LLAMA, _config(registry.META_LLAMA, read_json(folder / "params.json"),
                                            folder / "params.json")
    found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
    raise CheckpointError(f"no config.json (Hugging Face) or params.json (Meta) in {folder} (it holds: "
                          f"{', '.join(found) or 'nothing'}): give the folder the checkpoint was downloaded to")


def _config(arch: registry.Architecture, fields: dict, path: Path):
    try:
        return arch.config_from_hf(fields)
    except KeyError as e:
        raise CheckpointError(f"{path} has no {e.args[0]!r}, which a {arch.model.__name__} needs: fetch the file "
                              "again") from e
    except TypeError as e:  # a field of the wrong type: a string where a number belongs, ...
        raise CheckpointError(f"{path} has a field of the wrong type ({e}): fetch the file again") from e


def build(folder: str | Path | None = None, preset: str | None = None,
          dtype: torch.dtype | str | None = None) -> Built:
    """The model of a checkpoint folder (its config; a preset's shape where one is named), or of a preset
    alone, on the meta device. dtype: default the checkpoint's own, else float32. A folder written by
    `modelcode quantize` gets its quantized layers, empty."""
    if folder is None:
        if preset is None:
            raise ValueError("build a model from a checkpoint folder or a preset's name: neither was given")
        arch, config = registry.preset(preset)
    else:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {folder}")
        arch, config = read_config(folder, preset)
    if arch is registry.META_LLAMA and config.vocab_size is None:  # Llama 2's params.json says -1
        config.vocab_size = next(t.shape[0] for t in read_tensors(weight_files(folder))
                                 if t.name == "tok_embeddings.weight")
    dtype = resolve_dtype(dtype, getattr(config, "torch_dtype", None))
    quantized = quantization.read_quantized(folder) if folder is not None else None
    with torch.device("meta"):
        model = arch.model(config).to(dtype)
        weight_map = quantization.prepare_to_load(model, *quantized) if quantized else arch.weight_map
    return Built(model.eval(), config, arch, dtype, weight_map, quantized is not None)
