"""`modelcode.load`: one call from a checkpoint folder to everything needed to use the model."""

import importlib
from pathlib import Path

import torch

from modelcode.loading import load_model

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"tinystories-656k": ASSETS / "tinystories-656k"}  # models shipped inside the package
DEFAULT_MODEL = "tinystories-656k"


# Architecture.task -> the class `load` wraps the model in ("module:Class", imported when needed).
# Each has `from_folder(model, config, folder)`, which reads what else the task needs from the folder.
TASKS = {
    "causal-lm": "modelcode.lm:LM",
    "image-classification": "modelcode.tasks.classification:ImageClassifier",
    "translation": "modelcode.tasks.translation:Translator",
    "embedding": "modelcode.tasks.embedding:Embedder",
}


def resolve_path(path: str | Path | None) -> Path:
    """A folder, or the exact name of an embedded model (no download ever happens)."""
    if path is None:
        path = DEFAULT_MODEL
    if str(path) in EMBEDDED and not Path(path).exists():
        return EMBEDDED[str(path)]
    return Path(path)


def load(path: str | Path | None = None, dtype: torch.dtype | str | None = None,
         device: str | torch.device = "cpu", preset: str | None = None, adapter: str | Path | None = None):
    """Load a checkpoint folder (or an embedded model's name; default: TinyStories-656K) and wrap it for
    its task: a causal LM comes back as `modelcode.LM` (model, config, tokenizer, chat format, generate).

    dtype: default is the checkpoint's `torch_dtype`. preset: the exact name of a known shape for a
    Meta folder whose params.json is not enough (see `modelcode.loading.registry.PRESETS`). adapter: a LoRA
    adapter folder in peft's format, merged into the weights (kept beside them over a quantized base).
    """
    folder = resolve_path(path)
    model, config, arch = load_model(folder, dtype=dtype, device=device, preset=preset)
    if adapter is not None:
        from modelcode.training.adapter import load_adapter
        from modelcode.training.lora import QUANTIZED, lora_layers, merge_lora

        load_adapter(model, adapter, arch.weight_map)
        if not any(isinstance(m.base, QUANTIZED) for m in lora_layers(model).values()):
            merge_lora(model)
        model.eval()
    module, _, name = TASKS[arch.task].partition(":")
    return getattr(importlib.import_module(module), name).from_folder(model, config, folder)
