"""Write a model back as a checkpoint folder in its own (Hugging Face) layout: the inverse of the weight map
it was loaded with, so a folder written here loads in `modelcode.load` and in transformers alike."""

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from modelcode.errors import CheckpointError
from modelcode.loading.weight_maps import compile_map, invert, lookup
from modelcode.quantization.quantize import copy_non_weight_files


def to_checkpoint_names(tensors: dict[str, torch.Tensor], weight_map: dict) -> dict[str, torch.Tensor]:
    """{our name: tensor} -> {checkpoint name: tensor}, through the inverse of the weight map."""
    inverse = compile_map(invert(weight_map))
    out = {}
    for ours, t in tensors.items():
        rule = lookup(inverse, ours)
        if not rule or len(rule[0]) != 1:
            raise CheckpointError(f"no checkpoint name for {ours!r} in the weight map (only plain renames invert): "
                                  "it cannot be saved in the checkpoint's layout")
        out[rule[0][0]] = t
    return out


def save_checkpoint(model: nn.Module, weight_map: dict, source: str | Path, out: str | Path) -> Path:
    """`out/model.safetensors` in the checkpoint's layout, and every other top-level file of the `source`
    folder (config, tokenizer, generation config) copied as it is."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"the output folder is the source folder {source}: choose another, the source "
                         "weights would be overwritten")
    out.mkdir(parents=True, exist_ok=True)
    copy_non_weight_files(source, out)
    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}  # tied: once
    save_file(to_checkpoint_names(tensors, weight_map), out / "model.safetensors", metadata={"format": "pt"})
    return out
