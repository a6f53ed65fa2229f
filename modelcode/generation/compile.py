"""Compiled decoding, after gpt-fast: a static KV cache and a compiled one-token decode step.

Eager decoding pays, for every new token, the Python and dispatch cost of each op of the model, and a
growing cache changes shapes at every step. Here the cache is preallocated for a fixed number of
positions (slot j holds position j, written in place), and positions travel as tensors, never as Python
ints: every decode step of a given batch size has the same shapes and the same graph, so the step is
compiled once per batch size, whatever the prompt lengths or the number of new tokens.

Only the one-token decode step is compiled. Prefill runs eagerly: its shapes change with every prompt,
and it is a few large matrix products, where eager kernels already run at full speed. Sampling and the
one host sync per step (reading the new tokens for stop checks) stay outside the compiled step, in
`decode`.

How the step is compiled depends on the device. On GPU the step is recorded as a CUDA graph and
replayed, all its kernels with one launch (`mode="reduce-overhead"`). On CPU inductor writes C++; with
`freeze` it takes the weights as constants, which lets `autotune` time its own C++ micro-GEMMs (AMX or
AVX-512, on weights prepacked for them) against the library kernels, shape by shape, and keep the faster.
For the one-row matmuls of decoding its kernels stream weights faster than eager `F.linear` (see
BENCHMARKS.md). The price: a second, prepacked copy of the weights in memory (a third, briefly, while
compiling), a longer compile, and weights that must not change afterwards.
"""

import dataclasses

import torch
from torch import nn

from modelcode.layers import KVCache, StaticKVCache

# Positions a compiled model keeps cache slots for, unless told otherwise (or the model's context if smaller).
# Every step attends over all the slots (masked), so a cache far longer than needed costs time.
DEFAULT_MAX_SEQ_LEN = 2048


def compile_settings(device: torch.device, freeze: bool = True, autotune: bool = True) -> tuple[dict, dict]:
    """For a decode step on this device: keyword arguments for `torch.compile`, and the inductor settings
    to hold while it compiles."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}, {}  # CUDA graphs
    # The C++ wrapper calls the kernels from C++ rather than Python: it matters for small models.
    settings = {"cpp_wrapper": True}
    if freeze:
        # Freezing folds the weights into the compiled code as constants (inference only); max_autotune
        # times inductor's C++ GEMMs, which need constant weights, against the library's for each shape.
        settings |= {"freezing": True, "max_autotune": autotune, "max_autotune_report_choices_stats": False,
                     "autotune_num_choices_displayed": 0}
    return {}, settings


class CompiledModel:
    """Stands in for a causal LM in `generate`, `TextStream` and `ChatSession`: same `config`,
    `parameters`, `new_cache`, `hidden_states`, `logits` and `__call__`, but its caches are static and its
    one-token forward passes run compiled.

    Its context is `max_seq_len` positions (prompt and new tokens together); `config.max_seq_len` says so
    to the generation code, which ends sequences there. It keeps one cache per batch size and hands the
    same one out again, so a compiled model serves one generation (or one chat) at a time.

    CPU only: `freeze` compiles the weights in as constants (fastest, twice the weight memory, weights must
    not change afterwards); `autotune`, with `freeze`, lets inductor time its own matmul kernels (slower to
    compile). On GPU both are ignored: the step runs as a CUDA graph.
    """

    def __init__(self, model: nn.Module, max_seq_len: int | None = None, freeze: bool = True, autotune: bool = True):
        context = model.config.max_seq_len
        if max_seq_len is not None and not 1 < max_seq_len <= context:
            raise ValueError(f"max_seq_len={max_seq_len} for the compiled cache must be between 2 and the model's "
                             f"context ({context} positions)")
        self.model = model
        self.max_seq_len = max_seq_len or min(context, DEFAULT_MAX_SEQ_LEN)
        self.config = dataclasses.replace(model.config, max_seq_len=self.max_seq_len)
        self.device = next(model.parameters()).device
        self._caches: dict[int, StaticKVCache] = {}
        kwargs, self._inductor_settings = compile_settings(self.device, freeze, autotune)
        # dynamic=False: one graph per batch size, specialized to its shapes, never a symbolic one.
        self._step = torch.compile(self._forward, fullgraph=True, dynamic=False, **kwargs)
        self._compiled: set[int] = set()  # batch sizes whose step has been compiled

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model(tokens, positions, cache)

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    def new_cache(self, batch_size: int) -> StaticKVCache:
        """This batch size's static cache (made on first use, then reused: slots past a sequence's
        position are masked, so what an earlier generation left there is never seen)."""
        if batch_size not in self._caches:
            cache = self.model.new_cache(batch_size, self.max_seq_len, static=True)
            if self.device.type == "cuda":
                for t in cache.k + cache.v:  # the CUDA graph reads and writes these in place, never copies
                    torch._dynamo.mark_static_address(t)
            self._caches[batch_size] = cache
        return self._caches[batch_size]

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        return self.model.hidden_states(tokens, positions, cache)  # prefill: eager

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.logits(h)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                 cache: KVCache | None = None) -> torch.Tensor:
        batch = tokens.shape[0]
        if tokens.shape[1] != 1 or cache is None or cache is not self._caches.get(batch):
            return self.model(tokens, positions, cache)  # prefill, or a cache that is not ours: eager
        if batch in self._compiled:
            return self._step(tokens, positions, cache)
        from torch._inductor import config  # imported here: it takes a second, and only compiling needs it

        # The first call compiles. Dynamo reads `freezing` while it traces, i.e. inside this call, so the
        # settings are held around it (global config, restored on exit).
        with config.patch(self._inductor_settings):
            try:
                logits = self._step(tokens, positions, cache)
            except torch._dynamo.exc.TorchDynamoException as e:
                raise ValueError(f"torch.compile cannot capture {type(self.model).__name__}'s decode step as one "
                                 "graph (e.g. dynamic NTK rotary scaling reads the largest position on the host "
                                 f"every step): generate without compile. The compiler said: {e}") from e
        self._compiled.add(batch)
        return logits
