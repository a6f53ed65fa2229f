"""The sampler on crafted logits: greedy, top-k, top-p, temperature, seeds."""

import math

import pytest
import torch

from modelcode.generation import SamplingParams, probabilities, sample


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))


def test_top_k_1_equals_greedy():
    logits = torch.randn(8, 50)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(sample(logits, SamplingParams(temperature=1.5, top_k=1), g), logits.argmax(-1))


def test_top_k_keeps_k_most_likely():
    p = probabilities(logits_of([0.1, 0.4, 0.2, 0.3]), SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(p, torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))


@pytest.mark.parametrize(("top_p", "kept"), [(0.5, [1, 3]), (0.7, [1, 3]), (0.71, [1, 3, 2]), (0.4, [1]),
                                             (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    probs = [0.1, 0.4, 0.2, 0.3]  # sorted: 0.4 (id 1), 0.3 (id 3), 0.2 (id 2), 0.1 (id 0)
    p = probabilities(logits_of(probs), SamplingParams(temperature=1.0, top_p=top_p))[0]
    assert sorted(torch.nonzero(p).flatten().tolist()) == sorted(kept)
    expected = torch.tensor([probs[i] if i in kept else 0.0 for i in range(4)])
    torch.testing.assert_close(p, expected / expected.sum())


def test_temperature_sharpens_and_flattens():
    logits = logits_of([0.1, 0.6, 0.3])
    cold = probabilities(logits, SamplingParams(temperature=0.5))[0]
    hot = probabilities(logits, SamplingParams(temperature=2.0))[0]
    assert cold[1] > 0.6 > hot[1]


def test_seed_is_reproducible_and_samples_follow_the_distribution():
    logits = logits_of([0.1, 0.6, 0.3]).expand(20000, 3)
    params = SamplingParams(temperature=1.0)
    a = sample(logits, params, torch.Generator().manual_seed(7))
    b = sample(logits, params, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(logits, params, torch.Generator().manual_seed(8)))
    freq = torch.bincount(a, minlength=3).float() / len(a)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.015, rtol=0)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
