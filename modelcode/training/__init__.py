"""Fine-tuning: LoRA and full supervised fine-tuning, applied to a built model from outside; data, the training
loop, and outputs in the formats transformers and peft load."""

from modelcode.training.adapter import load_adapter, save_adapter
from modelcode.training.data import Example, load_dataset, pack
from modelcode.training.loop import TrainConfig, Trainer
from modelcode.training.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora

__all__ = ["Example", "LoRAConfig", "LoRALinear", "TrainConfig", "Trainer", "apply_lora", "load_adapter",
           "load_dataset", "merge_lora", "pack", "save_adapter"]
