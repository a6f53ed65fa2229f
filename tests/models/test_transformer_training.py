"""`models/transformer.py` trains from scratch: a tiny encoder-decoder, randomly initialized, learns to
reverse digit strings and then decodes held-out strings exactly (greedy, with the KV cache)."""

import time

import torch
import torch.nn.functional as F
from marian_reference import one_thread

from modelcode.models.transformer import Transformer, TransformerConfig
from modelcode.tasks.seq2seq import SearchSettings, greedy_search

PAD, EOS, BOS = 0, 1, 2
DIGITS = range(3, 13)  # token id of digit d is 3 + d
MAX_LEN = 8


def reversal_batch(strings: list[tuple[int, ...]]):
    """Source "d1 .. dn EOS", decoder input "BOS dn .. d1", target "dn .. d1 EOS", padded."""
    T = MAX_LEN + 1
    src = torch.full((len(strings), T), PAD)
    tgt_in, tgt_out = src.clone(), src.clone()
    for i, s in enumerate(strings):
        n = len(s)
        src[i, :n + 1] = torch.tensor([*s, EOS])
        tgt_in[i, :n + 1] = torch.tensor([BOS, *s[::-1]])
        tgt_out[i, :n + 1] = torch.tensor([*s[::-1], EOS])
    return src, src != PAD, tgt_in, tgt_out


def random_strings(g: torch.Generator, n: int, min_len: int, exclude: set = frozenset()) -> list[tuple[int, ...]]:
    out = []
    while len(out) < n:
        length = int(torch.randint(min_len, MAX_LEN + 1, (1,), generator=g))
        s = tuple(torch.randint(DIGITS.start, DIGITS.stop, (length,), generator=g).tolist())
        if s not in exclude:
            out.append(s)
    return out


def train_reversal(seed: int, steps: int = 300, batch_size: int = 128, lr: float = 3e-3, warmup: int = 50):
    """Train on fresh random strings each step; return (model, held-out strings)."""
    g = torch.Generator().manual_seed(seed)
    held_out = set(random_strings(g, 500, min_len=5))  # never trained on (shorter ones all would be)
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(vocab_size=13, dim=64, n_encoder_layers=2, n_decoder_layers=2, n_heads=4,
                                          hidden_dim=128, max_seq_len=16, pad_id=PAD, eos_id=EOS, decoder_start_id=BOS,
                                          output_bias=False, activation="relu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)  # the paper's betas
    # Warm up, then decay linearly to zero (post-LN Transformers need the warm-up; section 5.3).
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, (steps - s) / steps))
    model.train()
    for _ in range(steps):
        src, mask, tgt_in, tgt_out = reversal_batch(random_strings(g, batch_size, min_len=1, exclude=held_out))
        logits = model(src, tgt_in, mask)  # teacher forcing: (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), sorted(held_out)


def exact_match(model: Transformer, strings: list[tuple[int, ...]]) -> float:
    src, mask, _, tgt_out = reversal_batch(strings)
    settings = SearchSettings(max_new_tokens=MAX_LEN + 1, eos_id=EOS, pad_id=PAD, decoder_start_id=BOS)
    decoded = greedy_search(model, src, mask, settings)
    expected = [row[: row.index(EOS) + 1] for row in tgt_out.tolist()]
    return sum(d == e for d, e in zip(decoded, expected, strict=True)) / len(strings)


def test_learns_to_reverse_digit_strings():
    start = time.perf_counter()
    with one_thread():
        untrained = Transformer(TransformerConfig(vocab_size=13, dim=64, n_encoder_layers=2, n_decoder_layers=2,
                                                  n_heads=4, hidden_dim=128, max_seq_len=16, pad_id=PAD, eos_id=EOS,
                                                  decoder_start_id=BOS)).eval()
        model, held_out = train_reversal(seed=0)
        accuracy = exact_match(model, held_out)
        assert exact_match(untrained, held_out) == 0.0
    assert accuracy >= 0.99, f"exact match on held-out strings: {accuracy:.1%}"
    print(f"reversal: {accuracy:.1%} exact match on {len(held_out)} held-out strings, "
          f"{time.perf_counter() - start:.1f} s")
