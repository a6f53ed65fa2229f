"""The attention computation shared by every model: masks and scaled dot-product attention.

The projections live in each model file (their names follow each checkpoint); this module only
decides which keys each query may see, then calls PyTorch's fused `scaled_dot_product_attention`.
"""

import torch
import torch.nn.functional as F


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): query at position p sees keys at positions <= p.

    q_pos: (B, T) positions of the queries; k_pos: (B, S) or (S,) positions of the keys.
    With a sliding window (Mistral), it sees only the last `sliding_window` positions, itself included.
    """
    q = q_pos[:, None, :, None]  # (B, 1, T, 1)
    k = k_pos[..., None, None, :] if k_pos.dim() == 1 else k_pos[:, None, None, :]
    mask = k <= q
    if sliding_window is not None:
        mask = mask & (q - k < sliding_window)
    return mask


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, 1, 1, S) from a (B, S) 0/1 attention mask: no query sees a padding key."""
    return attention_mask.bool()[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           is_causal: bool = False) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) v with grouped-query attention.

    q: (B, n_heads, T, hd); k, v: (B, n_kv_heads, S, hd) with n_heads a multiple of n_kv_heads, so
    each group of n_heads / n_kv_heads query heads shares one key/value head (Ainslie et al. 2023).
    """
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
