"""Choosing the next token: a pure function of the logits and the settings, shared by `generate`,
speculative decoding and compiled decoding. No host syncs, so it can sit inside a compiled decode step."""

from dataclasses import dataclass

import torch

from modelcode.errors import ArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k None and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ArgumentError("temperature", f"must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ArgumentError("top_k", f"must be 1 or more (or unset for no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ArgumentError("top_p", f"must be more than 0 and at most 1, got {self.top_p}")


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: (B, V) logits -> (B, V) probabilities after temperature,
    top-k and top-p (nucleus: the smallest set of most likely tokens whose mass reaches top_p)."""
    logits = logits.float() / max(params.temperature, 1e-5)
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)  # already reached p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    greedy = params.temperature == 0.0
    return choose(logits, params, None if greedy else exponential_race(logits.shape, logits.device, generator))


def choose(logits: torch.Tensor, params: SamplingParams, race: torch.Tensor | None) -> torch.Tensor:
    """`sample` with its randomness given: `race` from `exponential_race` (None when greedy). A compiled
    decode step takes the noise as an input, drawn outside it from the caller's seeded generator."""
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    return (probabilities(logits, params) / race).argmax(dim=-1)


def exponential_race(shape: torch.Size, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exp(1) noise E: argmax(p / E) draws from p (the exponential-race form of the Gumbel-max trick),
    without torch.multinomial's host sync."""
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(1.0, generator=generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) probabilities -> (...) token ids drawn from them."""
    return (probs / exponential_race(probs.shape, probs.device, generator)).argmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the model's own distribution (before temperature/top-k/top-p)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
