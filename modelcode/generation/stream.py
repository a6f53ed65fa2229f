"""Streaming one sequence as text deltas, with stop strings that never leak into the output."""

import time
from collections.abc import Iterator

import torch

from modelcode.generation.detokenize import IncrementalDetokenizer
from modelcode.generation.generate import context_budget, decode, prefill
from modelcode.generation.sampling import SamplingParams
from modelcode.layers import KVCache


class TextStream:
    """Iterate for text deltas. Afterwards `tokens` holds the new ids, `text` the whole text and
    `finish_reason` is "stop" (stop id or string) or "length", and `prefill_seconds` the prompt's prefill time.

    A caller that keeps `cache` between calls (a chat) passes `cached`: how many leading prompt tokens
    are already in it, so only the rest is prefilled.
    """

    def __init__(self, model, tokenizer, prompt: list[int], max_new_tokens: int, params: SamplingParams,
                 stop_ids: frozenset[int], stop: list[str] | None = None, seed: int | None = None,
                 cache: KVCache | None = None, cached: int = 0):
        self.model, self.tokenizer, self.prompt, self.params = model, tokenizer, prompt, params
        self.budget = context_budget(model, [len(prompt)], max_new_tokens)[0]
        self.stop_ids, self.stop, self.seed = stop_ids, [s for s in stop or [] if s], seed
        self.cache = cache if cache is not None else model.new_cache(1)
        self.cached = cached
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.prefill_seconds = 0.0

    def __iter__(self) -> Iterator[str]:
        detok = IncrementalDetokenizer(self.tokenizer, self.prompt)
        hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may be forming in these
        emitted = 0
        start = time.perf_counter()
        logits, _ = prefill(self.model, self.cache, [self.prompt], [self.cached])
        if logits.is_cuda:
            torch.cuda.synchronize()
        self.prefill_seconds = time.perf_counter() - start
        generator = None if self.seed is None else torch.Generator(logits.device).manual_seed(self.seed)
        self.finish_reason = "length"

        def stop_check(_, token: int) -> bool:
            detok.add(token)
            return self._cut(detok.text) is not None

        for step in decode(self.model, self.cache, logits, [len(self.prompt)], [self.budget], self.params,
                           self.stop_ids, generator, stop_check=stop_check):
            if step.tokens[0] is None:
                self.finish_reason = "stop"  # a stop id
                continue
            self.tokens.append(step.tokens[0])
            cut = self._cut(detok.text)
            if cut is not None:
                self.finish_reason = "stop"
                self.text = detok.text[:cut]
                break
            ready = len(detok.text) - hold
            if ready > emitted:
                yield detok.text[emitted:ready]
                emitted = ready
        else:
            detok.flush()
            self.text = detok.text
        if len(self.text) > emitted:
            yield self.text[emitted:]

    def _cut(self, text: str) -> int | None:
        """Where the first stop string starts in text, if one is there."""
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None
