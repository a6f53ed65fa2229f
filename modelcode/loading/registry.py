"""One table from Hugging Face `model_type` to what it takes to build and load that architecture.

Adding a model means one model file, one config builder, one weight map, one line here and a test.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from modelcode.errors import UnsupportedModelError
from modelcode.loading.weight_maps import bert as bert_maps
from modelcode.loading.weight_maps import gpt_neox as gpt_neox_maps
from modelcode.loading.weight_maps import llama as llama_maps
from modelcode.loading.weight_maps import marian as marian_maps
from modelcode.loading.weight_maps import vit as vit_maps
from modelcode.models.bert import Bert, BertConfig
from modelcode.models.gpt_neox import GPTNeoX, GPTNeoXConfig
from modelcode.models.llama import PRESETS as LLAMA_PRESETS
from modelcode.models.llama import Llama, LlamaConfig
from modelcode.models.transformer import Transformer, TransformerConfig
from modelcode.models.vit import ViT, ViTConfig


@dataclass(frozen=True)
class Architecture:
    config_from_hf: Callable[[dict], object]
    model: type[nn.Module]
    weight_map: dict
    task: str = "causal-lm"  # what `modelcode.load` wraps the model in


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(LlamaConfig.from_hf, Llama, llama_maps.HF),
    "mistral": Architecture(LlamaConfig.from_hf, Llama, llama_maps.HF),
    "qwen2": Architecture(partial(LlamaConfig.from_hf, qkv_bias=True), Llama, llama_maps.HF),  # q, k, v biased
    "gpt_neox": Architecture(GPTNeoXConfig.from_hf, GPTNeoX, gpt_neox_maps.HF),
    "bert": Architecture(BertConfig.from_hf, Bert, bert_maps.HF, task="embedding"),
    "vit": Architecture(ViTConfig.from_hf, ViT, vit_maps.HF, task="image-classification"),
    "marian": Architecture(TransformerConfig.from_hf, Transformer, marian_maps.HF, task="translation"),
}

# Meta's own layout (params.json + consolidated.*.pth) exists for the Llama family only.
META_LLAMA = Architecture(LlamaConfig.from_meta, Llama, llama_maps.META)

# Named shapes: (architecture, config). For Meta folders and random-weight benchmarks.
PRESETS: dict[str, tuple[Architecture, object]] = {
    name: (META_LLAMA, LlamaConfig(**kw)) for name, kw in LLAMA_PRESETS.items()
}


def architecture(model_type: str | None) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported model_type {model_type!r} in config.json; "
                                    f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def preset(name: str) -> tuple[Architecture, object]:
    if name not in PRESETS:
        raise UnsupportedModelError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
