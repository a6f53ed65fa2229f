"""Choosing each request's next token with its own settings, inside one batch.

Greedy rows are one argmax together. A sampling row draws its noise from its own generator (seeded from
the request's seed), exactly as `generate` draws it for a lone prompt, so a seeded request gives the
same tokens whatever shares its batch, and the same as `lm.generate(..., seed=s)`.
"""

import torch

from modelcode.engine.request import Request
from modelcode.generation.sampling import SamplingParams, choose, exponential_race


def next_tokens(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """(B, V) logits, one row per request -> each request's next token."""
    biased = [r for r in requests if r.params.logit_bias]
    if biased:
        logits = logits.clone()
        for row, r in enumerate(requests):
            for token, bias in r.params.logit_bias:
                logits[row, token] += bias
    chosen = logits.argmax(dim=-1)
    for row, r in enumerate(requests):
        p = r.params
        if p.temperature > 0:
            race = exponential_race((1, logits.shape[-1]), logits.device, r.generator)
            chosen[row] = choose(logits[row : row + 1], SamplingParams(p.temperature, p.top_k, p.top_p), race)[0]
    return chosen.tolist()


def logprobs_of(logits: torch.Tensor, tokens: list[int], top_n: int) -> tuple[list[float], list[dict[int, float]]]:
    """Under the model's own distribution (before temperature, top-k, top-p and bias): log p of each row's
    token, and each row's top_n most likely tokens with theirs."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device)[:, None]).squeeze(-1).tolist()
    if top_n == 0:
        return chosen, [{} for _ in tokens]
    values, ids = lp.topk(top_n, dim=-1)
    return chosen, [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
