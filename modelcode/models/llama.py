"""The Llama family: Llama 2 and 3 (Touvron et al. 2023, arXiv:2302.13971 / 2307.09288; Grattafiori et
al. 2024, arXiv:2407.21783), Mistral (Jiang et al. 2023, arXiv:2310.06825), Qwen2 (Yang et al. 2024,
arXiv:2407.10671) and small TinyStories-style Llamas.

They are one architecture: a decoder-only Transformer with pre-RMSNorm, rotary positions, grouped-
query attention and a SwiGLU feed-forward. What tells them apart is data in the config, never a
name: Qwen2 adds a bias to q, k and v; Mistral limits attention to a sliding window; Llama 3 raises
rope_theta and 3.1 rescales rotary frequencies for long contexts; small models tie the output
projection to the embedding. Names follow Meta's reference code (`wq`, `attention_norm`, `w1`...).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from modelcode.layers import (
    KVCache,
    RMSNorm,
    RopeScaling,
    RotaryEmbedding,
    SameInput,
    ScaledDotProductAttention,
    SwiGLU,
    apply_rotary,
    causal_mask,
    new_cache,
)


@dataclass
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int  # the feed-forward's inner width
    n_kv_heads: int | None = None  # None: as many as query heads (plain multi-head attention)
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral
    sliding_layers: tuple[bool, ...] | None = None  # which layers use the window; None: all of them
    torch_dtype: str | None = None  # the checkpoint's dtype, the default when loading

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    def window(self, layer: int) -> int | None:
        if self.sliding_layers is not None and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, c: dict, qkv_bias: bool | None = None) -> "LlamaConfig":
        """From a Hugging Face `config.json` (llama, mistral or qwen2 `model_type`)."""
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={c['hidden_act']!r} is not supported: the Llama family uses 'silu'")
        # transformers 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`.
        rope = c.get("rope_parameters") or {"rope_theta": c.get("rope_theta", 10000.0), **(c.get("rope_scaling") or {})}
        sliding = c.get("sliding_window") if c.get("use_sliding_window", True) else None
        layer_types = c.get("layer_types")
        return cls(
            vocab_size=c["vocab_size"],
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads"),
            head_dim=c.get("head_dim"),
            hidden_dim=c["intermediate_size"],
            norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=RopeScaling.from_hf(rope),
            max_seq_len=c.get("max_position_embeddings", 2048),
            qkv_bias=c.get("attention_bias", False) if qkv_bias is None else qkv_bias,
            o_bias=c.get("attention_bias", False),
            mlp_bias=c.get("mlp_bias", False),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            sliding_window=sliding,
            sliding_layers=tuple(t == "sliding_attention" for t in layer_types) if layer_types and sliding else None,
            torch_dtype=c.get("dtype") or c.get("torch_dtype"),
        )

    @classmethod
    def from_meta(cls, p: dict, vocab_size: int | None = None) -> "LlamaConfig":
        """From Meta's `params.json`, which states the FFN width only through `multiple_of` and
        `ffn_dim_multiplier`; we derive it as Meta's reference code does."""
        dim = p["dim"]
        hidden = int(2 * (4 * dim) / 3)
        if p.get("ffn_dim_multiplier") is not None:
            hidden = int(p["ffn_dim_multiplier"] * hidden)
        hidden = p["multiple_of"] * math.ceil(hidden / p["multiple_of"])
        scaling = None
        if p.get("use_scaled_rope"):
            scaling = RopeScaling("llama3", factor=p.get("rope_scaling_factor", 8.0),
                                  original_max_position_embeddings=8192)
        return cls(
            vocab_size=p["vocab_size"] if p.get("vocab_size", -1) > 0 else vocab_size,
            dim=dim,
            n_layers=p["n_layers"],
            n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads"),
            hidden_dim=hidden,
            norm_eps=p.get("norm_eps", 1e-5),
            rope_theta=float(p.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=p.get("max_seq_len", 131072 if scaling else 8192 if "rope_theta" in p else 4096),
        )


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.sliding_window = cfg.window(layer)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.qkv = SameInput("wq", "wk", "wv")
        self.attend = ScaledDotProductAttention()

    def forward(self, x, cos, sin, positions, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.qkv(self, x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            k_pos = positions
        else:
            k, v = cache.update(self.layer, k, v, positions)  # (B, n_kv, S, hd)
            k_pos = torch.arange(k.shape[2], device=x.device)  # slot j holds position j
        y = self.attend(q, k, v, causal_mask(positions, k_pos, self.sliding_window))
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)

    def forward(self, x, cos, sin, positions, cache):
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """tokens (B, T) -> final normed hidden states (B, T, dim).

        positions (B, T): each token's position in its own sequence (default 0..T-1). With a cache,
        keys and values are stored at those positions and every earlier one is attended to.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        cos, sin = self.rotary(positions, h.dtype)  # (B, T, head_dim) each
        for layer in self.layers:
            h = layer(h, cos, sin, positions, cache)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., dim) -> next-token logits (..., vocab_size)."""
        return self.output(h)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(tokens, positions, cache))

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, static: bool = False,
                  dtype: torch.dtype | None = None, device=None) -> KVCache:
        """An empty KV cache sized for this model (see `layers/kv_cache.py`)."""
        p = self.tok_embeddings.weight  # never quantized: the dtype and device of the activations
        return new_cache(self.config, batch_size, max_seq_len, static, dtype or p.dtype, device or p.device)


# Shapes of well-known checkpoints, for Meta folders that carry only params.json and for benchmarks
# on random weights. Matched by exact name.
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096),
    "llama-3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                       rope_theta=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                         rope_theta=500000.0, max_seq_len=131072,
                         rope_scaling=RopeScaling("llama3", 8.0, 8192, 1.0, 4.0)),
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                         rope_theta=500000.0, max_seq_len=131072, tie_word_embeddings=True,
                         rope_scaling=RopeScaling("llama3", 32.0, 8192, 1.0, 4.0)),
    "mistral-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                       norm_eps=1e-6, max_seq_len=32768, sliding_window=4096),
    # TinyLlama-1.1B's shape: the "~1B Llama" of the benchmarks.
    "llama-1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                     max_seq_len=2048),
}
