"""Speculative decoding: a cheap drafter guesses the next k tokens, the model checks all of them in one pass.

Decoding one token at a time reads every weight of the model per token; a forward pass over k + 1
tokens costs about the same on a GPU. So a drafter proposes k tokens, the target model (the one whose
output we want) scores them in one pass, keeps the longest prefix it agrees with and adds one token
of its own: 1 to k + 1 tokens per target pass, and the output is the target's own: token for token
when greedy, in distribution when sampling (Leviathan et al. 2023, "Fast Inference from Transformers
via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling").

Two drafters:
- `DraftModel`: a smaller model with the same tokenizer decodes k tokens with its own KV cache.
- `PromptLookup` (Saxena 2023, "prompt lookup decoding"; transformers' `prompt_lookup_num_tokens`):
  no second model; the last n tokens are looked up earlier in the context and the tokens that
  followed them there are the draft. Cheap, and strong when the output copies its input (edits,
  summaries with quotes, code, repetitive text).

Rejected drafts need no cache surgery: cache slot j holds position j and attention hides slots past a
query's position (`layers/kv_cache.py`), so the next pass simply writes over them.

Batch size 1: sequences of a batch would accept different numbers of tokens per pass; serving many
sequences is the engine's job.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from modelcode.errors import ArgumentError
from modelcode.generation.generate import context_budget, prefill
from modelcode.generation.sampling import SamplingParams, draw, probabilities, sample
from modelcode.generation.session import common_prefix


@dataclass
class SpeculationStats:
    proposed: int = 0  # draft tokens the target checked
    accepted: int = 0  # of those, the ones it kept
    target_passes: int = 0  # target forward passes, prefill included (plain decoding needs one per new token)
    accepted_per_pass: list[int] = field(default_factory=list)  # histogram: passes that kept i drafts, at [i]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def summary(self, new_tokens: int) -> str:
        return (f"speculation: {self.accepted}/{self.proposed} draft tokens accepted ({self.acceptance_rate:.1%}), "
                f"{new_tokens} tokens in {self.target_passes} target passes "
                f"({new_tokens / max(self.target_passes, 1):.2f} tokens per pass)")


@dataclass
class SpeculativeOutput:
    tokens: list[int]  # the new tokens, stop token excluded
    stats: SpeculationStats


class DraftModel:
    """Proposes by decoding with a smaller model over the same vocabulary, with its own KV cache.

    `cached` is the token sequence whose keys and values the draft's cache holds; each call feeds only
    what differs from it, so tokens the target rejected are overwritten and accepted ones never rerun.
    """

    def __init__(self, model: nn.Module):
        self.model, self.cache, self.cached = model, model.new_cache(1), []
        self.device = next(model.parameters()).device

    def propose(self, tokens: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """k draft tokens after `tokens`, and q (k, V): the draft distribution each was drawn from
        (None when greedy)."""
        k = min(k, self.model.config.max_seq_len - len(tokens) + 1)  # the last draft is never fed
        if k <= 0:
            return [], None
        start = min(common_prefix(self.cached, tokens), len(tokens) - 1)  # feed >= 1 token for its logits
        x = torch.tensor([tokens[start:]], device=self.device)
        positions = torch.arange(start, len(tokens), device=self.device)[None]
        drafts, qs = [], []
        for _ in range(k):
            logits = self.model(x, positions, self.cache)[:, -1]  # (1, V)
            if params.temperature == 0.0:
                d = logits.argmax(dim=-1)
            else:
                qs.append(probabilities(logits, params))
                d = draw(qs[-1], generator)
            drafts.append(d)
            x, positions = d[:, None], positions[:, -1:] + 1
        drafts = torch.cat(drafts).tolist()
        self.cached = tokens + drafts[:-1]
        return drafts, torch.cat(qs) if qs else None


class PromptLookup:
    """Proposes the tokens that followed the most recent earlier occurrence of the context's last
    n-gram (n from `max_ngram` down to 1). q is one-hot: the draft is certain of its guess."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise ArgumentError("prompt_lookup", f"is the longest n-gram to look up and must be 1 or more, got "
                                f"{max_ngram}")
        self.max_ngram = max_ngram

    def propose(self, tokens: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], None]:
        context = torch.tensor(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            earlier = context[:-1].unfold(0, n, 1)  # (len - n, n): every n-gram that has a successor
            hits = (earlier == context[-n:]).all(dim=-1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n  # where the continuation begins
                drafts = []
                for i in range(k):  # copy as LZ77 does, so a short period repeats past the end of the context
                    j = start + i
                    drafts.append(tokens[j] if j < len(tokens) else drafts[j - len(tokens)])
                return drafts, None
        return [], None


def verify(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[int, int]:
    """How many drafts the target keeps, and the token it adds after them.

    logits (m + 1, V): the target's logits at the m draft positions and the one after the last draft;
    q (m, V): the distributions the drafts were drawn from (None: one-hot, a deterministic drafter).
    """
    m = len(drafts)
    if params.temperature == 0.0:
        # Greedy: keep drafts while each is the target's own argmax; at the first disagreement (or after
        # the last draft) the target's argmax is the next token. Exactly what plain greedy decoding emits.
        target = logits.argmax(dim=-1).tolist()  # m + 1 tokens
        n = next((i for i in range(m) if drafts[i] != target[i]), m)
        return n, target[n]
    # Sampling (Leviathan et al. 2023, Chen et al. 2023), with p the target's and q the draft's
    # distribution (both after temperature, top-k and top-p), draft i with token x is:
    #   accepted with probability min(1, p_i(x) / q_i(x))   [tested as u * q < p, u ~ U[0, 1)];
    #   at the first rejection, stop and draw the next token from norm(max(p_i - q_i, 0)) instead;
    #   if all m are accepted, draw a bonus token from p_m.
    # Then every emitted token is distributed exactly as if drawn from p: where q overshoots p the excess
    # is rejected, and the residual puts back precisely the mass q was missing. With prompt lookup q is
    # one-hot: x is kept with probability p_i(x), else the next token is drawn from p_i without x.
    p = probabilities(logits, params)  # (m + 1, V)
    d = torch.tensor(drafts, dtype=torch.long, device=p.device)
    if q is None:
        q = torch.nn.functional.one_hot(d, p.shape[-1]).to(p.dtype)
    i = torch.arange(m, device=p.device)
    u = torch.rand(m, generator=generator, device=p.device)
    n = int((u * q[i, d] < p[i, d]).cumprod(dim=0).sum())
    if n == m:
        return n, int(draw(p[m], generator))
    residual = (p[n] - q[n]).clamp(min=0)
    residual = residual if residual.sum() > 0 else p[n]  # p == q up to rounding: the residual is empty
    return n, int(draw(residual / residual.sum(), generator))


@torch.inference_mode()
def speculative_generate(model: nn.Module, prompt: list[int], max_new_tokens: int, draft: nn.Module | None = None,
                         prompt_lookup: int | None = None, speculate_k: int = 4,
                         params: SamplingParams = SamplingParams(), stop_ids: frozenset[int] = frozenset(),
                         seed: int | None = None,
                         stop_check: Callable[[int, int], bool] | None = None) -> SpeculativeOutput:
    """New tokens for one prompt, drafted by `draft` (a model with the same vocabulary) or by prompt
    lookup of n-grams up to `prompt_lookup` tokens, `speculate_k` drafts per target pass.

    Ends exactly as `generate` does: at a stop id (not returned), when stop_check(0, token) says so
    (the token is kept), at max_new_tokens or at the model's context length.
    """
    drafter = _drafter(model, prompt, draft, prompt_lookup, speculate_k)
    budget = context_budget(model, [len(prompt)], max_new_tokens)[0]
    cache = model.new_cache(1)
    logits, _ = prefill(model, cache, [prompt])
    generator = None if seed is None else torch.Generator(logits.device).manual_seed(seed)
    stats = SpeculationStats(target_passes=1, accepted_per_pass=[0] * (speculate_k + 1))
    tokens, new = list(prompt), []
    candidates = sample(logits, params, generator).tolist()  # the prefill's own next token
    if budget <= 0:
        return SpeculativeOutput(new, stats)
    while True:
        for token in candidates:
            if token in stop_ids:
                return SpeculativeOutput(new, stats)
            tokens.append(token)
            new.append(token)
            if len(new) == budget or (stop_check is not None and stop_check(0, token)):
                return SpeculativeOutput(new, stats)
        # The last token is not in the target's cache yet: feed it with the drafts, at their positions.
        # m + 1 <= tokens still allowed, so the pass never reaches past the budget or the context.
        drafts, q = drafter.propose(tokens, min(speculate_k, budget - len(new) - 1), params, generator)
        start = len(tokens) - 1
        x = torch.tensor([tokens[-1:] + drafts], device=logits.device)
        positions = torch.arange(start, start + x.shape[1], device=logits.device)[None]
        n, token = verify(model(x, positions, cache)[0], drafts, q, params, generator)
        stats.target_passes += 1
        stats.proposed += len(drafts)
        stats.accepted += n
        stats.accepted_per_pass[n] += 1
        candidates = drafts[:n] + [token]


PROBE = 'Once upon a time, 42 naïve cats said: "Hello,\tworld!"\n你好 🙂'


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids on a probe text with digits, accents, CJK and emoji."""
    return a.encode(PROBE, bos=True, eos=True) == b.encode(PROBE, bos=True, eos=True)


def _drafter(model: nn.Module, prompt: list[int], draft: nn.Module | None, prompt_lookup: int | None,
             speculate_k: int) -> DraftModel | PromptLookup:
    if not prompt or not isinstance(prompt[0], int):
        raise ValueError("speculative decoding takes one prompt as a non-empty list of token ids (batch size 1): "
                         "call it once per prompt, or use generate() for a batch")
    if speculate_k < 1:
        raise ArgumentError("speculate_k", f"is the number of draft tokens per target pass and must be 1 or more, "
                            f"got {speculate_k}")
    if (draft is None) == (prompt_lookup is None):
        raise ValueError("give exactly one drafter: a draft model, or prompt_lookup=n (the longest n-gram "
                         "to look up in the context)")
    if prompt_lookup is not None:
        return PromptLookup(prompt_lookup)
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {draft.config.vocab_size} tokens but the target's has "
                         f"{model.config.vocab_size}: the draft must share the target's tokenizer")
    return DraftModel(draft)
