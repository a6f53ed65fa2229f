"""LoRA adapters in peft's folder format: `adapter_config.json` and `adapter_model.safetensors`, whose keys are
the checkpoint's module names under peft's prefix (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
Names go through the architecture's weight map both ways, as the model's own weights do."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from modelcode.errors import CheckpointError
from modelcode.loading.weight_maps import compile_map, invert, lookup
from modelcode.training.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers

PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the transformers model
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _checkpoint_module(inverse, ours: str) -> str:
    """Our layer name (layers.0.attention.wq) -> the checkpoint's (model.layers.0.self_attn.q_proj)."""
    rule = lookup(inverse, ours + ".weight")
    if not rule:
        raise CheckpointError(f"layer {ours!r} has no plain name in the checkpoint layout: its adapter cannot be "
                              "written in peft's format")
    return rule[0][0].removesuffix(".weight")


def save_adapter(model: nn.Module, config: LoRAConfig, weight_map: dict, out: str | Path,
                 base_model: str | None = None) -> Path:
    """Write the LoRA layers of `model` as a peft adapter folder that peft's `PeftModel.from_pretrained` loads
    onto the transformers model of the same checkpoint."""
    out = Path(out)
    inverse = compile_map(invert(weight_map))
    tensors, modules = {}, set()
    for ours, layer in lora_layers(model).items():
        theirs = _checkpoint_module(inverse, ours)
        modules.add(theirs.rsplit(".", 1)[-1])
        tensors[f"{PREFIX}{theirs}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{theirs}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    if not tensors:
        raise ValueError("the model has no LoRA layers to save: apply_lora first")
    out.mkdir(parents=True, exist_ok=True)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    (out / CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    return out


# peft options that change what the adapter computes beyond W + scale B A: refused rather than ignored.
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None, "bias": "none", "layers_to_transform": None}


def read_adapter_config(folder: Path) -> LoRAConfig:
    path = folder / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG} in {folder}: an adapter folder is what peft's save_pretrained writes")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not JSON ({e}): fetch or write the adapter again") from e
    if c.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {c.get('peft_type')!r}; only LoRA adapters are supported")
    for key, plain in UNSUPPORTED.items():
        if c.get(key, plain) not in (plain, None, {}, "none"):
            raise CheckpointError(f"{path}: {key}={c[key]!r} is not supported (only plain LoRA on Linear layers)")
    targets = c["target_modules"]
    targets = tuple(targets) if isinstance(targets, list) else (targets,)
    return LoRAConfig(r=c["r"], alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0), targets=targets,
                      use_rslora=c.get("use_rslora", False))


def load_adapter(model: nn.Module, folder: str | Path, weight_map: dict) -> LoRAConfig:
    """Wrap `model`'s layers as the peft adapter in `folder` says and fill them with its weights (checked: every
    key is used, every wrapped layer has its A and B, every shape matches the base layer)."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    try:
        tensors = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {folder / WEIGHTS}: {e}") from e
    apply_lora(model, LoRAConfig(config.r, config.alpha, 0.0, _our_targets(config.targets), config.use_rslora),
               weight_map)
    forward = compile_map(weight_map)
    layers = lora_layers(model)
    filled = set()
    for key, value in tensors.items():
        ours, part = _our_name(forward, key, folder)
        if ours not in layers:
            raise CheckpointError(f"{folder / WEIGHTS}: {key!r} is for layer {ours!r}, which the adapter's "
                                  f"target_modules {list(config.targets)} do not name in this model")
        _fill(layers[ours], part, value, key, folder)
        filled.add((ours, part))
    missing = [f"{n}.{p}" for n in layers for p in ("lora_A", "lora_B") if (n, p) not in filled]
    if missing:
        raise CheckpointError(f"{folder / WEIGHTS} lacks {len(missing)} adapter tensor(s), e.g. {missing[0]!r}")
    return config


def _our_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    """peft's target_modules "all-linear" means every projection of the blocks (the head is never adapted)."""
    return ("all",) if "all-linear" in targets else targets


def _our_name(forward, key: str, folder: Path) -> tuple[str, str]:
    """peft key -> (our layer name, "lora_A" | "lora_B")."""
    module, _, tail = key.removeprefix(PREFIX).rpartition(".lora_")
    part = "lora_" + tail.removesuffix(".weight").removesuffix(".default")
    rule = lookup(forward, module + ".weight") if key.startswith(PREFIX) and part in ("lora_A", "lora_B") else None
    if not rule or len(rule[0]) != 1:
        raise CheckpointError(f"{folder / WEIGHTS}: unknown adapter tensor {key!r} (expected peft's "
                              f"'{PREFIX}<module>.lora_A.weight' for a Linear layer of this checkpoint)")
    return rule[0][0].removesuffix(".weight"), part


def _fill(layer: LoRALinear, part: str, value: torch.Tensor, key: str, folder: Path) -> None:
    target = getattr(layer, part)
    if value.shape != target.shape:
        raise CheckpointError(f"{folder / WEIGHTS}: {key!r} has shape {tuple(value.shape)}, but this model's layer "
                              f"({layer.in_features} in, {layer.out_features} out, r={layer.lora_A.shape[0]}) needs "
                              f"{tuple(target.shape)}: was the adapter trained on another base model?")
    with torch.no_grad():
        target.copy_(value)

