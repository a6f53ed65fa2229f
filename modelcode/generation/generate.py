"""Prefill then decode: text generation for a batch of prompts of unequal lengths.

Each sequence keeps its own positions: the prompts are right-padded for one prefill pass, and each
sequence then decodes at its own next position (see `layers/kv_cache.py` for why padding never
leaks into attention). A sequence stops at a stop id, when a caller's `stop_check` says so (stop
strings), at `max_new_tokens`, or at the model's context length, whichever comes first.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from modelcode.generation.sampling import SamplingParams, choose, sample, token_logprobs
from modelcode.layers import KVCache


class ContextLengthError(ValueError):
    """A prompt (or conversation) that does not fit the model's context."""


@dataclass
class Step:
    """One decode step: per sequence the new token (None once that sequence has finished)."""

    tokens: list[int | None]
    logprobs: list[float | None] | None


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # the new tokens of each prompt, stop token excluded
    logprobs: list[list[float]] | None  # log p of each new token, when asked for
    prompt_logprobs: list[list[float | None]] | None  # with echo: log p of each prompt token (None for the first)


def context_budget(model: nn.Module, lengths: list[int], max_new_tokens: int) -> list[int]:
    """New tokens each prompt may get; a prompt that leaves no room is an error that says so."""
    context = model.config.max_seq_len
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
        if n >= context:
            raise ContextLengthError(f"prompt {i} has {n} tokens, but the model's context is {context} tokens "
                                     f"and at least one new token must fit: shorten the prompt")
    return [min(max_new_tokens, context - n) for n in lengths]


@torch.inference_mode()
def prefill(model: nn.Module, cache: KVCache, prompts: list[list[int]], cached: list[int] | None = None,
            prompt_logprobs: bool = False) -> tuple[torch.Tensor, list[list[float | None]] | None]:
    """Run the not-yet-cached part of each prompt through the model, filling the cache.

    cached[b]: how many leading tokens of prompt b are already in the cache (a chat's earlier turns).
    Returns the logits after each prompt's last token (B, V) and, if asked, each prompt token's logprob.
    """
    device = next(model.parameters()).device
    cached = cached or [0] * len(prompts)
    cached = [min(c, len(p) - 1) for c, p in zip(cached, prompts)]  # always feed >= 1 token for its logits
    new = [p[c:] for p, c in zip(prompts, cached)]
    width = max(len(n) for n in new)
    tokens = torch.tensor([n + [0] * (width - len(n)) for n in new], device=device)  # right-padded
    positions = torch.tensor(cached, device=device)[:, None] + torch.arange(width, device=device)
    h = model.hidden_states(tokens, positions, cache)  # (B, width, dim)
    last = torch.tensor([len(n) - 1 for n in new], device=device)
    logits = model.logits(h[torch.arange(len(new), device=device), last])  # (B, V)
    if not prompt_logprobs:
        return logits, None
    if any(cached):
        raise ValueError("prompt logprobs need the whole prompt prefilled: do not reuse a cache with echo")
    all_lp = token_logprobs(model.logits(h[:, :-1]), tokens[:, 1:]).tolist()  # log p(token t+1 | ..t)
    return logits, [[None] + lp[: len(n) - 1] for lp, n in zip(all_lp, new)]


def decode_step(model: nn.Module, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                last_position: int | torch.Tensor, params: SamplingParams, logprobs: bool,
                generator: torch.Generator | None = None,
                race: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed one token per sequence (B, 1) at its position, sample the next: ((B,) ids, (B,) logprobs or None).

    Positions are clamped at `last_position` so that sequences which have already finished, idling while the
    others decode, never write past the cache. The sampling noise is drawn here from `generator`, unless
    given as `race` (a compiled model's steps, see compile.py, take it as an input)."""
    logits = model(tokens, positions.clamp(max=last_position), cache)[:, -1]
    next_tokens = sample(logits, params, generator) if race is None else choose(logits, params, race)
    return next_tokens, token_logprobs(logits, next_tokens) if logprobs else None


def decode_steps(model: nn.Module, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor,
                 last_position: int | torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `decode` advances by: the last call's (B, j) tokens in, its last column fed; here one
    `decode_step`, as (B, 1) ids and (B, 1) logprobs (or None); a compiled model's own returns k of each."""
    next_tokens, lp = decode_step(model, cache, tokens[:, -1:], positions, last_position, params, logprobs,
                                  generator)
    return next_tokens[:, None], None if lp is None else lp[:, None]


@torch.inference_mode()
def decode(model: nn.Module, cache: KVCache, logits: torch.Tensor, lengths: list[int], budgets: list[int],
           params: SamplingParams, stop_ids: frozenset[int] = frozenset(), generator: torch.Generator | None = None,
           logprobs: bool = False, stop_check: Callable[[int, int], bool] | None = None,
           ahead: bool | None = None) -> Iterator[Step]:
    """Sample, feed back, repeat: yields one Step per new position until every sequence has finished.

    logits: (B, V) after each prompt's last token; lengths: each prompt's length (its next position).
    stop_check(b, token) -> True ends sequence b after that token (it is kept, unlike a stop id).
    The model advances by `decode_steps` (one `decode_step`), or by its own (a compiled model: k per call),
    and the host reads each call's tokens at once, to check them for stops in order; tokens a sequence
    sampled after its end are dropped.

    ahead: launch each call before the host reads the last one's tokens, so that a GPU never waits for the
    host's stop checks (default: a compiled model on CUDA). Its static cache is written only up to the last
    position, so a call past a stop costs time, never the cache; none is launched past the budgets.
    """
    advance = getattr(model, "decode_steps", None) or partial(decode_steps, model)
    device = logits.device
    ahead = hasattr(model, "decode_steps") and device.type == "cuda" if ahead is None else ahead
    positions = torch.tensor(lengths, device=device)[:, None]  # (B, 1): where the next fed token goes
    last_position = max(n + b for n, b in zip(lengths, budgets)) - 1
    if last_position >= model.config.max_seq_len:  # a compiled model's cache would be written out of bounds
        raise ContextLengthError(f"prompt and new tokens reach position {last_position}, past the model's context "
                                 f"of {model.config.max_seq_len} positions: cap the budgets with context_budget")
    last = torch.tensor(last_position, device=device)  # made once: on a GPU a tensor from the host costs a copy
    first = sample(logits, params, generator)
    chunk = first[:, None]
    chunk_lp = token_logprobs(logits, first)[:, None] if logprobs else None
    produced = [0] * len(lengths)
    done = [b <= 0 for b in budgets]
    while not all(done):
        arriving = to_host(chunk, chunk_lp)
        launched = None
        if ahead and any(not d and n + chunk.shape[1] < b for d, n, b in zip(done, produced, budgets)):
            launched = advance(cache, chunk, positions, last, params, generator, logprobs)  # within the budgets
        columns, lps = arriving()  # the one host sync per call
        for i, column in enumerate(columns):
            step = Step([None] * len(done), [None] * len(done) if logprobs else None)
            for b, token in enumerate(column):
                if done[b]:
                    continue
                if token in stop_ids:
                    done[b] = True
                    continue
                step.tokens[b] = token
                if logprobs:
                    step.logprobs[b] = lps[b][i]
                produced[b] += 1
                stopped = stop_check is not None and stop_check(b, token)  # sees every token, the last one too
                done[b] = stopped or produced[b] >= budgets[b]
            yield step
            if all(done):
                return
        chunk, chunk_lp = launched or advance(cache, chunk, positions, last, params, generator, logprobs)
        positions = positions + chunk.shape[1]


def to_host(tokens: torch.Tensor, logprobs: torch.Tensor | None) -> Callable[[], tuple[list, list | None]]:
    """Start moving a call's (B, k) tokens and logprobs to the host; the function returned waits for them and
    gives the tokens by step (k lists of B) and the logprobs by sequence. On CUDA the copy is queued behind
    the call that made them, so the wait is for that call only, not for any launched after it."""
    if tokens.device.type != "cuda":
        return lambda: (tokens.T.tolist(), None if logprobs is None else logprobs.tolist())
    host = [None if t is None else t.to("cpu", non_blocking=True) for t in (tokens, logprobs)]
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> tuple[list, list | None]:
        copied.synchronize()
        return host[0].T.tolist(), None if host[1] is None else host[1].tolist()
    return wait


def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams = SamplingParams(),
             stop_ids: frozenset[int] = frozenset(), seed: int | None = None, logprobs: bool = False,
             echo: bool = False, stop_check: Callable[[int, int], bool] | None = None) -> GenerationOutput:
    """New tokens for each prompt (token ids in, token ids out)."""
    lengths = [len(p) for p in prompts]
    budgets = context_budget(model, lengths, max_new_tokens)
    cache = model.new_cache(len(prompts))
    logits, prompt_lp = prefill(model, cache, prompts, prompt_logprobs=logprobs and echo)
    generator = None if seed is None else torch.Generator(logits.device).manual_seed(seed)
    tokens: list[list[int]] = [[] for _ in prompts]
    lps: list[list[float]] = [[] for _ in prompts]
    for step in decode(model, cache, logits, lengths, budgets, params, stop_ids, generator, logprobs, stop_check):
        for b, token in enumerate(step.tokens):
            if token is not None:
                tokens[b].append(token)
                if logprobs:
                    lps[b].append(step.logprobs[b])
    return GenerationOutput(tokens, lps if logprobs else None, prompt_lp)
