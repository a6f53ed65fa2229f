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


def test_static_cache_gives_a_prompt_the_slots_up_to_its_last_position_and_a_decode_step_all():
    from modelcode.layers import StaticKVCache

    cache = StaticKVCache(n_layers=1, batch_size=2, n_kv_heads=2, head_dim=4, max_seq_len=32)
    k = torch.randn(2, 2, 5, 4)
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])  # the second continues an earlier prompt
    got_k, got_v = cache.update(0, k, k + 1, positions)
    assert got_k.shape == got_v.shape == (2, 2, 8, 4)  # slots 0..7: no query sees a later one
    assert torch.equal(got_k[1, :, 3:8], k[1]) and torch.equal(got_v[0, :, :5], k[0] + 1)
    got_k, _ = cache.update(0, torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4), torch.tensor([[5], [8]]))
    assert got_k.shape == (2, 2, 32, 4)  # a decode step: the fixed shape a compiled step is built for
