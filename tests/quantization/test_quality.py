"""Perplexity, agreement and the quality report of `modelcode quantize`."""

import math

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import cli_error
from torch import nn

import modelcode
from modelcode.cli.__main__ import main as cli
from modelcode.quantization import Int8Linear, PackedInt4Linear
from modelcode.quantization.quality import perplexity, quality_report, read_texts, top1_agreement


class Uniform(nn.Module):
    """Equal logits for every token: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab_size: int, max_seq_len: int = 16):
        super().__init__()
        self.config = type("Config", (), {"max_seq_len": max_seq_len})()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab_size)


@pytest.fixture(scope="module")
def lm():
    return modelcode.load("tinystories-656k")


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    assert perplexity(Uniform(50), [1, 2, 3, 4, 5, 6, 7] * 10) == pytest.approx(50)


def test_perplexity_is_exp_mean_nll(lm):
    seqs = [[1, 80, 147, 201, 282, 57, 9, 33], [1, 80, 5, 6]]
    nll = []
    with torch.no_grad():
        for s in seqs:
            t = torch.tensor([s])
            nll.append(F.cross_entropy(lm.model(t)[0, :-1], t[0, 1:], reduction="none"))
    expected = math.exp(torch.cat(nll).mean().item())
    assert perplexity(lm.model, seqs) == pytest.approx(expected, rel=1e-5)
    assert perplexity(lm.model, torch.tensor(seqs[0])) == pytest.approx(math.exp(nll[0].mean().item()), rel=1e-5)


def test_long_sequences_are_scored_in_windows(lm):
    """With a window of 5, tokens 4 and 8 are predicted from the start of a new window (overlap of one)."""
    seq = [1, 80, 147, 201, 282, 57, 9, 33, 12, 7]
    nll = 0.0
    with torch.no_grad():
        for start in (0, 4, 8):
            t = torch.tensor([seq[start:start + 5]])
            nll += F.cross_entropy(lm.model(t)[0, :-1], t[0, 1:], reduction="sum").item()
    assert perplexity(lm.model, seq, window=5) == pytest.approx(math.exp(nll / 9), rel=1e-5)
    assert perplexity(lm.model, seq, window=5) != pytest.approx(perplexity(lm.model, seq), rel=1e-4)


def test_top1_agreement_of_a_model_with_itself_and_with_another(lm):
    seqs = [lm.tokenizer.encode(t, bos=True) for t in read_texts()[:2]]
    assert top1_agreement(lm.model, lm.model, seqs) == 1.0
    assert top1_agreement(lm.model, Uniform(2048, 512), seqs) < 0.5


def test_report_of_a_model_against_itself(lm):
    r = quality_report(lm, lm, read_texts()[:3], n_tokens=16)
    assert r.perplexity_change == 0 and r.top1_agreement == 1 and r.greedy_matched == [16, 16, 16]
    assert "(+0.00%)" in str(r) and "16.0 of 16 tokens identical on average over 3 prompts (3 fully" in str(r)


def test_bad_input():
    with pytest.raises(ValueError, match="at least one sequence of 2 or more tokens"):
        perplexity(Uniform(10), [[1], []])
    with pytest.raises(ValueError, match="window=1: a window needs at least 2 tokens"):
        perplexity(Uniform(10), [1, 2, 3], window=1)


def test_cli_writes_a_folder_that_loads_and_prints_the_report(tmp_path, capsys, lm):
    cli(["quantize", "tinystories-656k", "--mode", "int8", "--out", str(tmp_path / "q")])
    out = capsys.readouterr().out
    assert "int8, 14 Linear layers quantized (output head: not quantized)" in out  # tied: it stays
    assert "quality on 8 held-out texts" in out and "perplexity" in out and "greedy" in out
    q = modelcode.load(tmp_path / "q")
    assert isinstance(q.model.layers[1].feed_forward.w2, Int8Linear)
    ppl = float(out.split("perplexity")[1].split("->")[1].split()[0])  # the report measured the written folder
    stories = [lm.tokenizer.encode(t, bos=True, eos=True) for t in read_texts()]
    assert perplexity(q.model, stories) == pytest.approx(ppl, abs=1e-3)


def test_cli_int4_without_report_and_bad_group_size(tmp_path, capsys):
    cli(["quantize", "tinystories-656k", "--mode", "int4", "--group-size", "64", "--out", str(tmp_path / "q"),
         "--no-report"])
    out = capsys.readouterr().out
    assert "int4, group size 64, 14 Linear layers quantized" in out and "perplexity" not in out
    layer = modelcode.load(tmp_path / "q").model.layers[0].attention.wq
    assert isinstance(layer, PackedInt4Linear) and layer.group_size == 64
    cli_error(["quantize", "tinystories-656k", "--mode", "int4", "--group-size", "48", "--out", str(tmp_path / "b")],
              capsys, "group_size 48 is not supported: use one of 32, 64, 128, 256")
