"""`modelcode check`: our model beside transformers on the same checkpoint folder, as a verdict table."""

import sys


def main(model: str | None = None, *, new_tokens: int = 16, atol: float = 1e-4) -> None:
    """Check a checkpoint against transformers on the same folder; exit status 0 when every check holds.

    For a causal LM: the largest logit difference on sample texts, greedy agreement over --new-tokens, a batch
    equal to its prompts alone, tokenizer ids and text equal to transformers' tokenizer (Chinese, emoji, code,
    leading spaces), the chat prompt with exactly one BOS, and the stop ids. For other models: their outputs
    on a sample batch, and the tokenizer. Both run in float32 on CPU; transformers must be installed.

    Args:
        model: checkpoint folder, or an embedded model's name (default: the embedded TinyStories-656K).
        new_tokens: new tokens to compare greedy decoding over.
        atol: the largest logit difference that passes (float32).
    """
    from modelcode.errors import ArgumentError
    from modelcode.parity import run_checks, table

    if new_tokens < 1:
        raise ArgumentError("new_tokens", f"must be 1 or more, got {new_tokens}")
    checks = run_checks(model, new_tokens, atol)
    print(table(checks))
    if any(c.ok is False for c in checks):
        sys.exit(1)
