"""How far a quantized model strays from the original: perplexity on held-out text, how often the two
agree on the next token, and how long their greedy continuations stay identical."""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# A few TinyStories-style children's stories, written for this project (never seen in training).
HELDOUT = Path(__file__).resolve().parent.parent / "assets" / "heldout-stories.txt"


def read_texts(path: str | Path = HELDOUT) -> list[str]:
    """The paragraphs of a text file (separated by blank lines)."""
    texts = [p.strip() for p in Path(path).read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not texts:
        raise ValueError(f"{path} has no text: give a file of paragraphs separated by blank lines")
    return texts


def _sequences(token_ids) -> list[list[int]]:
    token_ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
    seqs = [list(token_ids)] if token_ids and isinstance(token_ids[0], int) else [list(s) for s in token_ids]
    if not any(len(s) >= 2 for s in seqs):
        raise ValueError("perplexity needs at least one sequence of 2 or more tokens (one to predict from)")
    return seqs


def _window(model: nn.Module, window: int | None) -> int:
    window = window or model.config.max_seq_len
    if window < 2:
        raise ValueError(f"window={window}: a window needs at least 2 tokens (one to predict from)")
    return window


@torch.no_grad()
def _token_logits(model: nn.Module, seq: list[int], window: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, next-token targets) for every token of `seq` but the first, one window at a time."""
    ids = torch.tensor(seq, device=next(model.parameters()).device)
    for start in range(0, len(seq) - 1, window - 1):  # windows overlap by one token: each target is scored once
        yield model(ids[start:start + window][None])[0, :-1].float(), ids[start + 1:start + window]


def perplexity(model: nn.Module, token_ids: list[int] | list[list[int]], window: int | None = None) -> float:
    """exp(mean negative log-likelihood of each token given the ones before it).

    token_ids: one sequence, or several (e.g. one per document, each starting with BOS) scored on their
    own. A sequence longer than `window` tokens (default: the model's context, `config.max_seq_len`) is
    scored in consecutive windows.
    """
    window = _window(model, window)
    nll, count = 0.0, 0
    for seq in _sequences(token_ids):
        for logits, targets in _token_logits(model, seq, window):
            nll += F.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    return math.exp(nll / count)


def top1_agreement(reference: nn.Module, model: nn.Module, token_ids: list[int] | list[list[int]],
                   window: int | None = None) -> float:
    """The fraction of positions of the text where both models' most likely next token is the same."""
    window = _window(reference, window)
    same, count = 0, 0
    for seq in _sequences(token_ids):
        for (a, _), (b, _) in zip(_token_logits(reference, seq, window), _token_logits(model, seq, window)):
            same += (a.argmax(-1) == b.argmax(-1)).sum().item()
            count += len(a)
    return same / count


def greedy_agreement(reference, quantized, prompts: list[list[int]], n_tokens: int = 128) -> list[int]:
    """For each prompt, how many of the first `n_tokens` greedy tokens the two models have in common before
    they first differ. reference, quantized: what `modelcode.load` returns (their `generate` is used)."""
    kw = dict(max_new_tokens=n_tokens, temperature=0.0, stop_ids=frozenset())  # no early stop: all n_tokens
    a, _ = reference.generate(prompts, **kw)
    b, _ = quantized.generate(prompts, **kw)
    return [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t))) for s, t in zip(a, b)]


@dataclass
class QualityReport:
    reference_perplexity: float
    perplexity: float
    top1_agreement: float
    greedy_matched: list[int]  # per prompt: greedy tokens identical before the first difference
    n_tokens: int  # greedy tokens generated per prompt
    n_texts: int
    n_text_tokens: int

    @property
    def perplexity_change(self) -> float:
        """Relative change of perplexity, e.g. 0.012 for +1.2%."""
        return self.perplexity / self.reference_perplexity - 1

    def __str__(self) -> str:
        g, n = self.greedy_matched, self.n_tokens
        return "\n".join([
            f"quality on {self.n_texts} held-out texts ({self.n_text_tokens} tokens), quantized vs original:",
            f"  perplexity       {self.reference_perplexity:.3f} -> {self.perplexity:.3f} "
            f"({self.perplexity_change:+.2%})",
            f"  next-token top-1 {self.top1_agreement:.1%} of positions agree",
            f"  greedy           {sum(g) / len(g):.1f} of {n} tokens identical on average over {len(g)} prompts "
            f"({sum(m == n for m in g)} fully identical)"])


def quality_report(reference, quantized, texts: list[str] | None = None, n_tokens: int = 128,
                   prompt_tokens: int = 8) -> QualityReport:
    """Compare a quantized model with its original on held-out texts (default: the stories shipped in
    `modelcode/assets`). Greedy prompts are the first `prompt_tokens` tokens of each text.
    reference, quantized: what `modelcode.load` returns; the reference's tokenizer encodes the texts.

    Each text is scored as a complete document, BOS to EOS: ending is part of a story, and the
    probability of the document includes the model's choice to stop there.
    """
    tok = reference.tokenizer
    if tok is None:
        raise ValueError(f"no tokenizer in {reference.path}: the quality report needs one to encode its texts")
    seqs = [tok.encode(t, bos=True, eos=True) for t in (texts or read_texts())]
    return QualityReport(
        reference_perplexity=perplexity(reference.model, seqs),
        perplexity=perplexity(quantized.model, seqs),
        top1_agreement=top1_agreement(reference.model, quantized.model, seqs),
        greedy_matched=greedy_agreement(reference, quantized, [s[:prompt_tokens] for s in seqs], n_tokens),
        n_tokens=n_tokens, n_texts=len(seqs), n_text_tokens=sum(len(s) for s in seqs))
