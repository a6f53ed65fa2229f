"""Prefill + step-by-step decode with a KV cache gives the logits of one full forward pass."""

import pytest
import torch
from hf_reference import assert_cached_decode_equals_full_pass, random_prompts, tiny_hf_model

import modelcode


@pytest.fixture(scope="module", params=["llama3-gqa", "mistral-sliding-window", "qwen2-qkv-bias"])
def lm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    tiny_hf_model(request.param).save_pretrained(folder)
    return modelcode.load(folder)


@pytest.mark.parametrize("static", [False, True])
def test_prefill_then_decode_equals_full_pass(lm, static):
    assert_cached_decode_equals_full_pass(lm.model, lm.config.vocab_size, static)


@pytest.mark.parametrize("static", [False, True])
def test_unequal_lengths_share_a_batch(lm, static):
    """Right-padded prefill: each sequence writes at its own positions; the pad slots are hidden,
    then overwritten by that sequence's own decode steps."""
    a, b = random_prompts(lm.config.vocab_size, batch=2, length=10, seed=1)
    lengths = [7, 4]  # prompt lengths; both then decode the rest of their own sequence
    with torch.no_grad():
        alone = [lm.model(a[None]), lm.model(b[None])]
        cache = lm.model.new_cache(batch_size=2, max_seq_len=16, static=static)
        prompt = torch.zeros(2, 7, dtype=torch.long)
        prompt[0], prompt[1, :4] = a[:7], b[:4]
        positions = torch.arange(7).expand(2, 7)
        out = lm.model(prompt, positions, cache)
        torch.testing.assert_close(out[0], alone[0][0, :7], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, :4], alone[1][0, :4], atol=1e-5, rtol=1e-5)
        for step in range(3):
            pos = torch.tensor([[lengths[0] + step], [lengths[1] + step]])
            step_tokens = torch.stack([a[pos[0]], b[pos[1]]])
            out = lm.model(step_tokens, pos, cache)
            torch.testing.assert_close(out[0, 0], alone[0][0, pos[0, 0]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[1, 0], alone[1][0, pos[1, 0]], atol=1e-5, rtol=1e-5)
