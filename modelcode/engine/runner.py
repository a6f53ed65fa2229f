"""One step's forward passes over the paged cache: chunks of different requests, lengths and positions.

The decode chunks (one token each) run as one batch; the prompt chunks as another, right-padded to the
longest (a step holds few of them: the token budget caps their sum). Padding one-token rows to a long
prompt's width would multiply the decode rows' work by that width, where a second pass costs one more
read of the weights. Each row writes its keys and values through its block table and attends to its own
positions only (see `layers/kv_cache.py`: `PagedKVCache`).
"""

import torch
from torch import nn

from modelcode.engine.blocks import SCRATCH_BLOCK
from modelcode.engine.scheduler import Chunk
from modelcode.layers import PagedKVCache


class Runner:
    def __init__(self, model: nn.Module, cache: PagedKVCache, max_seq_len: int, device: torch.device):
        self.model, self.cache, self.max_seq_len, self.device = model, cache, max_seq_len, device

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> dict[int, torch.Tensor]:
        """Compute the chunks; returns, by position in `chunks`, the logits the engine needs from each:
        (length, V) for a chunk whose request scores its prompt, else (1, V) after its last token, and
        nothing for a prompt chunk that is not the prompt's last."""
        out: dict[int, torch.Tensor] = {}
        for group in ([i for i, c in enumerate(chunks) if c.length == 1],
                      [i for i, c in enumerate(chunks) if c.length > 1]):
            if group:
                out.update(zip(group, self._forward([chunks[i] for i in group])))
        return {i: logits for i, logits in out.items() if logits is not None}

    def _forward(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        width = max(c.length for c in chunks)
        bs = self.cache.block_size
        n_blocks = max(-(-(c.start + c.length) // bs) for c in chunks)
        tokens, positions, slots, tables = [], [], [], []
        for c in chunks:
            pad = width - c.length
            tokens.append(c.request.ids[c.start : c.start + c.length] + [0] * pad)
            positions.append([min(p, self.max_seq_len - 1) for p in range(c.start, c.start + width)])
            blocks = c.request.blocks
            slots.append([blocks[p // bs] * bs + p % bs for p in range(c.start, c.start + c.length)]
                         + [SCRATCH_BLOCK * bs] * pad)
            tables.append(blocks[:n_blocks] + [SCRATCH_BLOCK] * (n_blocks - len(blocks[:n_blocks])))
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        self.cache.bind(as_tensor(tables), as_tensor(slots))
        h = self.model.hidden_states(as_tensor(tokens), as_tensor(positions), self.cache)  # (B, width, dim)
        results: list[torch.Tensor | None] = [None] * len(chunks)
        last = [row for row, c in enumerate(chunks) if c.completes and not c.request.wants_prompt_logprobs]
        if last:  # one matmul with the output head for every row that samples
            index = as_tensor([chunks[row].length - 1 for row in last])
            for row, logits in zip(last, self.model.logits(h[as_tensor(last), index]).unsqueeze(1)):
                results[row] = logits
        for row, c in enumerate(chunks):
            if c.request.wants_prompt_logprobs:
                results[row] = self.model.logits(h[row, : c.length])
        return results
