"""The attention computation shared by every model: masks and scaled dot-product attention.

The projections live in each model file (their names follow each checkpoint); this module only
decides which keys each query may see, then calls PyTorch's fused `scaled_dot_product_attention`
(or, for decoding's lone query on CPU, where that kernel is slow, two plain matrix products).
`ScaledDotProductAttention` is the same computation as a module, for decoders whose attention a
kernel may take over from outside (`kernels/attention.py` swaps it).
"""

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): query at position p sees keys at positions <= p.

    q_pos: (B, T) positions of the queries; k_pos: (B, S) or (S,) positions of the keys.
    With a sliding window (Mistral), it sees only the last `sliding_window` positions, itself included.
    Without a cache the keys are the queries' own tokens (k_pos is q_pos), and a row may pack several
    sequences (fine-tuning's packing): a position that does not follow the one before it starts another
    sequence, whose queries see none of the keys before it (transformers reads packed position_ids the same way).
    """
    q = q_pos[:, None, :, None]  # (B, 1, T, 1)
    k = k_pos[..., None, None, :] if k_pos.dim() == 1 else k_pos[:, None, None, :]
    mask = k <= q
    if sliding_window is not None:
        mask = mask & (q - k < sliding_window)
    if k_pos is q_pos and q_pos.shape[1] > 1:
        starts = torch.ones_like(q_pos, dtype=torch.bool)
        starts[:, 1:] = q_pos[:, 1:] != q_pos[:, :-1] + 1
        seq = starts.cumsum(1)  # (B, T): which packed sequence each token belongs to
        mask = mask & (seq[:, None, :, None] == seq[:, None, None, :])
    return mask


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, 1, 1, S) from a (B, S) 0/1 attention mask: no query sees a padding key."""
    return attention_mask.bool()[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) v with grouped-query attention; `mask` (boolean, broadcast to (B, 1, T, S)) says
    which keys each query sees.

    q: (B, n_heads, T, hd); k, v: (B, n_kv_heads, S, hd) with n_heads a multiple of n_kv_heads, so
    each group of n_heads / n_kv_heads query heads shares one key/value head (Ainslie et al. 2023).
    """
    if q.shape[2] == 1 and q.device.type == "cpu":
        return attend_one_query(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`attend` for one query per sequence (decoding) on CPU: two matrix products and a softmax, in float32.
    PyTorch's CPU flash-attention kernel is made for blocks of queries: on a lone query it spends far longer per
    key than these two products do."""
    batch, n_heads, _, hd = q.shape
    n_kv_heads = k.shape[1]
    group = q.reshape(batch, n_kv_heads, n_heads // n_kv_heads, hd).float() * hd**-0.5  # heads sharing k, v
    scores = group @ k.float().transpose(-1, -2)  # (B, n_kv_heads, group, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # (B, 1, 1, S) broadcasts over the heads
    return (scores.softmax(-1) @ v.float()).view(batch, n_heads, 1, hd).to(q.dtype)


class ScaledDotProductAttention(nn.Module):
    """`attend` as a module: the attention core of a decoder layer, between its projections and its cache.
    It holds no weights; it is a module so that a kernel can be swapped in for it from outside."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return attend(q, k, v, mask)
