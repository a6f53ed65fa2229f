"""modelcode's CPU attention kernel for decoding (one query per sequence) against attention in float64."""

import math

import pytest
import torch
from kernel_marks import ATTENTION_KERNEL

from modelcode.kernels.attention import CPUDecodeAttention, swap_decode_attention
from modelcode.kernels.cpu import decode_attention, decode_attention_fits
from modelcode.layers.attention import ScaledDotProductAttention, attend, causal_mask


def reference(q, k, v, mask):
    """Softmax attention in float64, each group of query heads on its shared key/value head."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def random_inputs(batch, n_heads, n_kv_heads, slots, hd, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, 1, hd, generator=g).to(dtype)
    k = (3 * torch.randn(batch, n_kv_heads, slots, hd, generator=g)).to(dtype)  # peaked softmax, not flat
    v = torch.randn(batch, n_kv_heads, slots, hd, generator=g).to(dtype)
    return q, k, v


@ATTENTION_KERNEL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, n_heads, n_kv_heads, slots, hd", [
    (16, 32, 4, 160, 64),  # llama-1b, batch 16: groups of 8 query heads per key/value head
    (1, 8, 8, 37, 16),  # one head per key/value head; slots not a multiple of 16
    (3, 14, 2, 5, 64),  # Qwen2's groups of 7; fewer slots than one block
    (2, 12, 4, 300, 80),  # a head size that is not a power of two
    (2, 4, 1, 33, 256),
])
def test_matches_attention_in_float64(dtype, batch, n_heads, n_kv_heads, slots, hd):
    q, k, v = random_inputs(batch, n_heads, n_kv_heads, slots, hd, dtype)
    positions = torch.randint(0, slots, (batch, 1), generator=torch.Generator().manual_seed(1))
    for mask in (causal_mask(positions, torch.arange(slots)), causal_mask(positions, torch.arange(slots), 7), None):
        out = decode_attention(q, k, v, mask)
        assert out.shape == q.shape and out.dtype == dtype
        ref = reference(q, k, v, mask)
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        else:  # computed in float32 from the same bfloat16 inputs: only the output's rounding to bfloat16 is left
            torch.testing.assert_close(out.double(), ref, atol=2**-8 * ref.abs().max().item(), rtol=0)


@ATTENTION_KERNEL
def test_reads_a_cache_sliced_from_a_longer_one_and_an_arbitrary_mask():
    q, k, v = random_inputs(3, 8, 2, 100, 64, torch.bfloat16)
    k, v = k[:, :, :70], v[:, :, :70]  # what a growing cache returns: a view, rows still contiguous
    mask = torch.rand(3, 1, 1, 70, generator=torch.Generator().manual_seed(2)) < 0.3  # e.g. padding
    mask[:, ..., 0] = True
    out = decode_attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=2**-8 * 3, rtol=0)


@ATTENTION_KERNEL
def test_blocks_the_mask_hides_are_skipped_without_changing_the_output():
    """A query at position 20 of a 2048-slot cache sees 21 keys (2 blocks of 16 read, 126 skipped): the same
    output as over 21 slots."""
    q, k, v = random_inputs(2, 8, 2, 2048, 64, torch.float32)
    mask = causal_mask(torch.tensor([[20], [1000]]), torch.arange(2048))
    out = decode_attention(q, k, v, mask)
    short = decode_attention(q[:1], k[:1, :, :21], v[:1, :, :21], None)
    torch.testing.assert_close(out[:1], short, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.double(), reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


@ATTENTION_KERNEL
def test_a_query_that_sees_no_key_gets_nan_as_softmax_gives():
    q, k, v = random_inputs(2, 4, 2, 20, 32, torch.float32)
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    mask[1] = False
    out = decode_attention(q, k, v, mask)
    assert out[1].isnan().all() and not out[0].isnan().any()
    assert reference(q, k, v, mask)[1].isnan().all()


@ATTENTION_KERNEL
def test_the_swapped_attention_core_uses_it_for_one_query_only():
    # float32: the torch ops round differently in most outputs, so equality says which path ran
    model = torch.nn.ModuleDict({"attend": ScaledDotProductAttention()})
    assert swap_decode_attention(model) == 1 and isinstance(model["attend"], CPUDecodeAttention)
    q, k, v = random_inputs(4, 8, 4, 50, 64, torch.float32)
    mask = causal_mask(torch.tensor([[10], [20], [30], [49]]), torch.arange(50))
    assert decode_attention_fits(q, k, v, mask)
    assert torch.equal(model["attend"](q, k, v, mask), decode_attention(q, k, v, mask))
    assert not torch.equal(attend(q, k, v, mask), decode_attention(q, k, v, mask))  # the plain computation
    prompt = causal_mask(torch.arange(50).expand(4, 50), torch.arange(50))
    q = random_inputs(4, 8, 4, 50, 64, torch.float32)[0].expand(4, 8, 50, 64)  # 50 queries: not the kernel's
    assert torch.equal(model["attend"](q, k, v, prompt), attend(q, k, v, prompt))


def test_what_it_does_not_take_goes_to_the_torch_ops():
    q, k, v = random_inputs(1, 4, 2, 10, 64, torch.float32)
    assert not decode_attention_fits(q[..., :24], k[..., :24], v[..., :24], None)  # head size not a multiple of 16
    assert not decode_attention_fits(q.double(), k.double(), v.double(), None)
    assert not decode_attention_fits(q, k, v, torch.ones(1, 4, 1, 10, dtype=torch.bool))  # a mask per head
    assert not decode_attention_fits(q, k, v.transpose(2, 3).contiguous().transpose(2, 3), None)  # v's layout
    q.requires_grad_(True)
    assert not decode_attention_fits(q, k, v, None)  # the kernel has no backward
    out = attend(q, k, v, None)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
