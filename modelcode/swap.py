"""Changing a model from outside it, as quantization and modelcode's kernels do: swapping a named layer for
another, and knowing which weights are tied to the embeddings (those must stay as they are)."""

from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (e.g. "layers.0.attention.wq") is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def embedding_weights(model: nn.Module) -> set[int]:
    """ids of the embedding matrices: an output head whose weight is one of them is tied to the embeddings."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
