"""The modules that talk to the other ranks: each wraps one layer of a rank's shard and adds the collective that
makes its output the whole model's (Megatron-LM's parallel layers, Shoeybi et al. 2019, arXiv:1909.08053).

Collectives are `torch.distributed`'s functional ones, which torch.compile traces into the graph; on CPU they
run over gloo, on GPU over NCCL. A layer split by output (q, k, v; gate and up) needs no wrapper: each rank
just computes its own heads or hidden units from the whole input.
"""

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup


class RowParallel(nn.Module):
    """A layer split by input (attention output, MLP down): each rank multiplies its slice of the input (its heads
    or hidden units) by its slice of the weight's columns, and an all-reduce sums the partial outputs. The bias is
    added once, after the sum."""

    def __init__(self, linear: nn.Module, group: ProcessGroup):
        super().__init__()
        self.bias = linear.bias
        linear.bias = None
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = funcol.all_reduce(self.linear(x), "sum", self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """An embedding split by vocabulary: this rank holds the rows of tokens [start, start + num_embeddings); it
    looks up the tokens that are its own, zeros for the rest, and an all-reduce sums the ranks' rows."""

    def __init__(self, embedding: nn.Embedding, start: int, group: ProcessGroup):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        self.weight = embedding.weight
        self.start, self.group = start, group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        mine = (local >= 0) & (local < self.num_embeddings)
        rows = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * mine[..., None]
        return funcol.all_reduce(rows, "sum", self.group)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, start={self.start}"


class GatheredHead(nn.Module):
    """An output head split by vocabulary: each rank computes the logits of its own tokens, and an all-gather puts
    them side by side, so every rank holds the whole (..., vocab_size) logits and samples the same token."""

    def __init__(self, linear: nn.Module, group: ProcessGroup):
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return funcol.all_gather_single(y.contiguous(), y.dim() - 1, self.group)
