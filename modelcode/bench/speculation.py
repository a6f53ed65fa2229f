"""Speculative decoding in `modelcode bench`: plain greedy decoding and speculative decoding of the same prompt,
interleaved in one run, with the acceptance rate, the tokens per target pass and the speed-up.

Both run the eager model at batch size 1 (speculation checks one sequence's drafts per pass) and are timed
from the prompt to the last new token, prefill included, since speculation changes how many passes the
whole generation takes.
"""

import statistics
import time

from torch import nn

from modelcode.bench.measure import run_ours, sync
from modelcode.generation.speculative import speculative_generate


def run_speculative(model: nn.Module, prompt: list[int], new_tokens: int, draft: nn.Module | None,
                    prompt_lookup: int | None, speculate_k: int):
    """(seconds, tokens, stats) of one greedy speculative generation of exactly `new_tokens` (no stop ids)."""
    device = next(model.parameters()).device
    sync(device)
    start = time.perf_counter()
    out = speculative_generate(model, prompt, new_tokens, draft, prompt_lookup, speculate_k)
    sync(device)
    return time.perf_counter() - start, out.tokens, out.stats


def bench_speculation(model: nn.Module, prompt: list[int], new_tokens: int, draft: nn.Module | None = None,
                      prompt_lookup: int | None = None, speculate_k: int = 4, repeats: int = 3, warmup: int = 1,
                      log=print) -> dict:
    """Median tokens/s of plain and speculative greedy decoding of `prompt`, interleaved repeats."""
    method = f"prompt lookup n={prompt_lookup}" if draft is None else "draft model"
    plain_s, spec_s = [], []
    for i in range(warmup + repeats):
        plain = run_ours(model, [prompt], new_tokens)
        seconds, tokens, stats = run_speculative(model, prompt, new_tokens, draft, prompt_lookup, speculate_k)
        if i >= warmup:
            plain_s.append(plain.first_token_s + plain.decode_s)
            spec_s.append(seconds)
    plain_tok_s, spec_tok_s = new_tokens / statistics.median(plain_s), new_tokens / statistics.median(spec_s)
    result = dict(method=method, speculate_k=speculate_k, plain_tok_s=plain_tok_s, speculative_tok_s=spec_tok_s,
                  speedup=spec_tok_s / plain_tok_s, acceptance_rate=stats.acceptance_rate,
                  tokens_per_target_pass=len(tokens) / stats.target_passes,
                  same_tokens=tokens == plain.tokens[0])
    log(f"speculative decoding ({method}, k={speculate_k}): {spec_tok_s:.1f} tok/s vs plain {plain_tok_s:.1f}")
    return result


def describe(spec: dict) -> str:
    """One line for the bench's table."""
    return (f"speculative decoding (batch 1, eager, greedy), {spec['method']}, k={spec['speculate_k']}: "
            f"{spec['speculative_tok_s']:.1f} tok/s vs plain {spec['plain_tok_s']:.1f} ({spec['speedup']:.2f}x), "
            f"{spec['acceptance_rate']:.1%} of drafts accepted, {spec['tokens_per_target_pass']:.2f} tokens per "
            f"target pass, same tokens: {'yes' if spec['same_tokens'] else 'NO'}")

