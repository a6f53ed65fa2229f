"""Fine-tune a checkpoint on a data file and write what the rest of the ecosystem loads: the fine-tuned model
as a Hugging Face folder (for LoRA: merged), and for LoRA the adapter in peft's format under `adapter/`."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

import modelcode
from modelcode.api import resolve_path
from modelcode.lm import LM
from modelcode.loading import load_model, resolve_dtype
from modelcode.loading.save import save_checkpoint
from modelcode.quantization import quantize
from modelcode.training.adapter import load_adapter, save_adapter
from modelcode.training.data import Dataset, load_dataset, pack
from modelcode.training.loop import TrainConfig, Trainer
from modelcode.training.lora import LoRAConfig, apply_lora, merge_lora


@dataclass
class FinetuneConfig:
    method: str = "lora"  # "lora" or "full"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quantize: str | None = None  # LoRA over an "int8" or "int4" base (QLoRA)
    max_len: int | None = None  # tokens per example (packed row); None: the model's context, at most 1024
    too_long: str = "truncate"  # or "skip"
    pack: bool = False
    val_fraction: float = 0.05
    dtype: str | None = None  # None: float32 (bfloat16 with quantize)
    device: str = "cpu"


@dataclass
class Result:
    lm: LM  # the fine-tuned (merged) model, as loaded back from the output folder
    data: Dataset
    log: list[dict]
    out: Path
    trained: tuple[int, int]  # (parameters trained, parameters of the model)


def load_for_training(model: str | Path, cfg: FinetuneConfig) -> tuple[LM, dict]:
    """The model (trainable parameters set as the method says) and its architecture's weight map."""
    if cfg.method not in ("lora", "full"):
        raise ValueError(f"method {cfg.method!r}: use 'lora' or 'full'")
    if cfg.quantize and cfg.method != "lora":
        raise ValueError("--quantize trains LoRA adapters on a quantized base: use it with --method lora")
    folder = resolve_path(model)
    dtype = cfg.dtype or ("bfloat16" if cfg.quantize else "float32")
    net, config, arch = load_model(folder, dtype=dtype, device=cfg.device)
    lm = LM.from_folder(net, config, folder)
    if lm.tokenizer is None:
        raise ValueError(f"no tokenizer files in {folder}: fine-tuning data is text, the model needs its tokenizer")
    if cfg.quantize:
        quantize(net, cfg.quantize, pack=False)
    if cfg.method == "lora":
        torch.manual_seed(cfg.train.seed)  # the adapters' initialisation
        apply_lora(net, cfg.lora, arch.weight_map)
    else:
        for p in net.parameters():
            p.requires_grad_(True)
    return lm, arch.weight_map


def finetune(model: str | Path, data: str | Path, out: str | Path, cfg: FinetuneConfig,
             resume: bool = False) -> Result:
    out = Path(out)
    if not resume and out.exists() and any(out.iterdir()):
        raise ValueError(f"the output folder {out} is not empty: choose a new one, or --resume the run in it")
    lm, weight_map = load_for_training(model, cfg)
    max_len = cfg.max_len or min(lm.config.max_seq_len, 1024)
    dataset = load_dataset(data, lm.tokenizer, lm.chat_format, max_len, cfg.val_fraction, cfg.too_long,
                           cfg.train.seed)
    train = pack(dataset.train, max_len) if cfg.pack else dataset.train
    pad = lm.tokenizer.pad_id if lm.tokenizer.pad_id is not None else 0
    trainer = Trainer(lm.model, train, dataset.val, cfg.train, out, pad)
    trained = trainable(lm.model)
    log = trainer.run(resume)
    if cfg.method == "lora":
        save_adapter(lm.model, cfg.lora, weight_map, out / "adapter", base_model=str(model))
        merged = merged_model(lm, weight_map, out / "adapter", cfg)
    else:
        merged = lm.model
    save_checkpoint(merged.to(_checkpoint_dtype(lm)), weight_map, lm.path, out)
    del lm, merged, trainer
    return Result(modelcode.load(out, dtype=torch.float32, device=cfg.device), dataset, log, out, trained)


def merged_model(lm: LM, weight_map: dict, adapter: Path, cfg: FinetuneConfig) -> torch.nn.Module:
    """The adapters folded into the base. A quantized base is not what users merge into: the saved adapter
    goes onto the original weights, loaded afresh."""
    if not cfg.quantize:
        return merge_lora(lm.model)
    net, _, _ = load_model(lm.path, dtype=cfg.dtype or "bfloat16", device=cfg.device)
    load_adapter(net, adapter, weight_map)
    return merge_lora(net)


def _checkpoint_dtype(lm: LM) -> torch.dtype:
    """The dtype the source checkpoint was stored in (its config's torch_dtype), else the model's own."""
    stored = getattr(lm.config, "torch_dtype", None)
    return resolve_dtype(stored, None) if stored else next(lm.model.parameters()).dtype


def trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
