"""`modelcode.load`: one call from a checkpoint folder to everything needed to use the model."""

import importlib
from pathlib import Path

import torch

from modelcode.errors import CheckpointError
from modelcode.loading import load_model
from modelcode.loading.build import read_config

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


def not_found(folder: Path) -> str:
    """Why a model name found no folder, and what to run instead: modelcode never downloads."""
    text = f"checkpoint folder not found: {folder}"
    if len(folder.parts) == 2 and not str(folder).startswith((".", "/", "~")):  # looks like a hub id, ORG/NAME
        text += (f"; modelcode never downloads: fetch it first (`hf download {folder} --local-dir "
                 f"{folder.name}`) and pass that folder")
    return text + f" (embedded models: {', '.join(EMBEDDED)}; `modelcode list` shows what runs without a download)"


# What a task's model is called, and the commands that use it.
TASK_NAMES = {"causal-lm": ("a causal language model", "generate, chat, serve"),
              "image-classification": ("an image classifier", "classify"),
              "translation": ("a translation model", "translate"),
              "embedding": ("a text encoder", "embed, similarity")}


def load(path: str | Path | None = None, dtype: torch.dtype | str | None = None,
         device: str | torch.device = "cpu", preset: str | None = None, adapter: str | Path | None = None,
         task: str | None = None, tp: int | None = None):
    """Load a checkpoint folder (or an embedded model's name; default: TinyStories-656K) and wrap it for
    its task: a causal LM comes back as `modelcode.LM` (model, config, tokenizer, chat format, generate).

    dtype: default is the checkpoint's `torch_dtype`. preset: the exact name of a known shape for a
    Meta folder whose params.json is not enough (see `modelcode.loading.registry.PRESETS`). adapter: a LoRA
    adapter folder in peft's format, merged into the weights (kept beside them over a quantized base). task:
    the task the caller needs ("causal-lm", "embedding", ...): a folder of another kind is an error that
    says so before any weight is read. tp: inside a process that torchrun started (one per rank), split the
    model across the `tp` ranks: this one loads only its share.
    """
    folder = resolve_path(path)
    if not folder.is_dir():
        raise FileNotFoundError(not_found(folder))
    if task is not None:
        arch, _ = read_config(folder, preset)
        if arch.task != task:
            what, commands = TASK_NAMES[arch.task]
            raise CheckpointError(f"{folder} holds a {arch.model.__name__}, not {TASK_NAMES[task][0]}: it is {what}, "
                                  f"for modelcode {commands}")
    shard = None
    if tp is not None:
        if adapter is not None:
            raise ValueError("an adapter and tp together are not supported: merge the adapter into a checkpoint "
                             "first, then load that with tp")
        from modelcode.parallel.process import start

        shard, device = start(tp, device)
    model, config, arch = load_model(folder, dtype=dtype, device=device, preset=preset, shard=shard)
    if adapter is not None:
        from modelcode.training.adapter import load_adapter
        from modelcode.training.lora import QUANTIZED, lora_layers, merge_lora

        load_adapter(model, adapter, arch.weight_map)
        if not any(isinstance(m.base, QUANTIZED) for m in lora_layers(model).values()):
            merge_lora(model)
        model.eval()
    module, _, name = TASKS[arch.task].partition(":")
    return getattr(importlib.import_module(module), name).from_folder(model, config, folder)
