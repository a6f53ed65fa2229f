"""A sample batch for each task, the calls that run a model on it, and the KV cache a decoder keeps per token.

The sample is small (one sequence of a few tokens, one image), made on the model's own device, so that
on the meta device (`modelcode show` builds the model there from config.json alone) it costs nothing.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from modelcode.layers import KVCache
from modelcode.loading import registry

SEQ_LEN = 8  # tokens in the sample sequence
SOURCE_LEN = 7  # the encoder-decoder's source is another length, so that its shapes tell the two apart


def task_of(model: nn.Module) -> str:
    """The registry's task for this model's class ("causal-lm", "embedding", ...)."""
    for arch in registry.ARCHITECTURES.values():
        if type(model) is arch.model:
            return arch.task
    raise ValueError(f"{type(model).__name__} is not in the architecture registry, so its sample input is unknown: "
                     f"register it in modelcode/loading/registry.py, or pass `task=` (one of {', '.join(TASKS)})")


def _tokens(n: int, vocab_size: int, device) -> torch.Tensor:
    return (torch.arange(n, device=device) % vocab_size)[None]  # (1, n)


@dataclass(frozen=True)
class Task:
    inputs: Callable[[object, torch.device], dict[str, torch.Tensor]]  # (config, device) -> named inputs
    run: Callable[[nn.Module, dict], dict[str, torch.Tensor]]  # (model, inputs) -> named outputs
    kv_cache: Callable[[nn.Module, dict], "KVCacheSize | None"] | None = None  # decoders only


def _run_encoder(model: nn.Module, x: dict) -> dict[str, torch.Tensor]:
    """An encoder's forward gives hidden states; its heads (BERT's pooler, masked-LM head) run when it has them."""
    h = model(x["tokens"])
    out = {"hidden states": h}
    if getattr(model, "pooler", None) is not None:
        out["pooled"] = model.pooled(h)
    if getattr(model, "mlm", None) is not None:
        out["masked-LM logits"] = model.logits(h)
    return out


class RecordingCache(KVCache):
    """Keeps nothing: notes the keys and values each layer would store, and hands them straight back (the
    same as a first pass into an empty cache)."""

    def __init__(self):
        self.stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer, k, v, positions):
        self.stored[layer] = (k, v)
        return k, v


@dataclass
class KVCacheSize:
    """What a decoder's KV cache holds per token: 2 (k and v) × layers × kv heads × head_dim × bytes."""

    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_element: int
    per: str = "token"
    cross_bytes_per_source_token: int | None = None  # encoder-decoder: the cross-attention's keys and values

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_element

    @classmethod
    def measure(cls, stored: list[tuple[torch.Tensor, torch.Tensor]], per: str = "token") -> "KVCacheSize | None":
        """None when the model stored nothing (its forward takes a cache but does not use one)."""
        if not stored:
            return None
        k, v = stored[0]  # (B, n_kv, T, hd)
        shapes = {(t.shape[1], t.shape[3], t.element_size()) for kv in stored for t in kv}
        if len(shapes) != 1:
            raise ValueError(f"layers store keys/values of different shapes {sorted(shapes)}: no single per-layer size")
        return cls(len(stored), k.shape[1], k.shape[3], k.element_size(), per)

    def __str__(self) -> str:
        s = (f"KV cache: 2 (k, v) × {self.layers} layers × {self.kv_heads} kv heads × {self.head_dim} head_dim × "
             f"{self.bytes_per_element} bytes = {self.bytes_per_token:,} bytes per {self.per}")
        if self.cross_bytes_per_source_token is not None:
            s += f"; cross-attention: {self.cross_bytes_per_source_token:,} bytes per source token"
        return s


def _kv_causal_lm(model: nn.Module, x: dict) -> KVCacheSize | None:
    if "cache" not in inspect.signature(model.forward).parameters:
        return None
    cache = RecordingCache()
    model(x["tokens"], cache=cache)
    return KVCacheSize.measure([cache.stored[i] for i in sorted(cache.stored)])


def _kv_translation(model: nn.Module, x: dict) -> KVCacheSize | None:
    cache = model.new_cache()
    cache.self_attn = RecordingCache()  # the target side; the cross-attention part fills `cache.cross` itself
    model.decode(x["target ids"], model.encode(x["source ids"]), cache=cache)
    size = KVCacheSize.measure([cache.self_attn.stored[i] for i in sorted(cache.self_attn.stored)], "target token")
    if size is not None:
        size.cross_bytes_per_source_token = sum(t.nbytes for kv in cache.cross for t in kv) // x["source ids"].numel()
    return size


TASKS: dict[str, Task] = {
    "causal-lm": Task(lambda c, d: {"tokens": _tokens(SEQ_LEN, c.vocab_size, d)},
                      lambda m, x: {"logits": m(x["tokens"])}, _kv_causal_lm),
    "embedding": Task(lambda c, d: {"tokens": _tokens(SEQ_LEN, c.vocab_size, d)}, _run_encoder),
    "image-classification": Task(lambda c, d: {"pixels": torch.zeros(1, c.num_channels, *c.image_size, device=d)},
                                 lambda m, x: {"class logits": m(x["pixels"])}),
    "translation": Task(lambda c, d: {"source ids": _tokens(SOURCE_LEN, c.vocab_size, d),
                                      "target ids": _tokens(SEQ_LEN - 3, c.target_vocab_size, d)},
                        lambda m, x: {"logits": m(x["source ids"], x["target ids"])}, _kv_translation),
}


def task(model: nn.Module, name: str | None = None) -> Task:
    name = name or task_of(model)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
