"""The few blocks that are literally shared between model files."""

from modelcode.layers.attention import ScaledDotProductAttention, attend, causal_mask, padding_mask
from modelcode.layers.kv_cache import ContiguousKVCache, KVCache, PagedKVCache, StaticKVCache, new_cache
from modelcode.layers.mlp import SwiGLU
from modelcode.layers.norm import RMSNorm
from modelcode.layers.projection import SameInput
from modelcode.layers.rotary import RopeScaling, RotaryEmbedding, apply_rotary

__all__ = [
    "ContiguousKVCache", "KVCache", "PagedKVCache", "RMSNorm", "RopeScaling", "RotaryEmbedding", "SameInput",
    "ScaledDotProductAttention", "StaticKVCache", "SwiGLU", "apply_rotary", "attend", "causal_mask", "new_cache",
    "padding_mask",
]
