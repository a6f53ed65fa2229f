"""GPT-NeoX (Black et al. 2022, "GPT-NeoX-20B", arXiv:2204.06745): the architecture of GPT-NeoX-20B,
the Pythia suite (Biderman et al. 2023, arXiv:2304.01373), RedPajama-INCITE and Dolly v2.

A decoder-only Transformer like GPT-2/GPT-J, with three choices of its own, all read from config.json:
- rotary positions on only part of each head (`rotary_pct`, 25% in Pythia): the leading dims are
  rotated, the rest carry no position at all;
- the parallel residual of GPT-J (`use_parallel_residual`): attention and MLP both read the same
  input, x + attn(ln1(x)) + mlp(ln2(x)), so the two can run at once; off, it is the usual sequential
  pre-LayerNorm block;
- LayerNorm with biases, a GELU MLP of width 4 * dim, biases everywhere, and an output projection
  (`embed_out`) not tied to the input embedding.
Names follow the checkpoints (`embed_in`, `input_layernorm`, `dense_h_to_4h`...). The checkpoints fuse
q, k and v into one matrix; the weight map splits it (see `loading/weight_maps/gpt_neox.py`).
"""

from dataclasses import dataclass

import torch
from torch import nn

from modelcode.layers import (
    KVCache,
    RopeScaling,
    RotaryEmbedding,
    SameInput,
    ScaledDotProductAttention,
    apply_rotary,
    causal_mask,
    new_cache,
)
from modelcode.layers.activation import gelu


@dataclass
class GPTNeoXConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int  # the MLP's inner width (4 * dim in every released model)
    rotary_pct: float = 0.25  # share of each head's dims that are rotated
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    use_parallel_residual: bool = True
    norm_eps: float = 1e-5
    hidden_act: str = "gelu"  # GPT-NeoX-20B: "gelu_fast" (tanh approximation)
    attention_bias: bool = True
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None  # the checkpoint's dtype, the default when loading

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"hidden_size={self.dim} is not a multiple of num_attention_heads={self.n_heads}")

    @property
    def n_kv_heads(self) -> int:  # plain multi-head attention
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @classmethod
    def from_hf(cls, c: dict) -> "GPTNeoXConfig":
        """From a Hugging Face `config.json` (model_type gpt_neox)."""
        # transformers 5 writes `rope_parameters`; older configs `rotary_pct`, `rotary_emb_base`, `rope_scaling`.
        rope = c.get("rope_parameters") or {"rope_theta": c.get("rotary_emb_base", 10000.0),
                                            "partial_rotary_factor": c.get("rotary_pct", 0.25),
                                            **(c.get("rope_scaling") or {})}
        return cls(
            vocab_size=c["vocab_size"],
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            hidden_dim=c["intermediate_size"],
            rotary_pct=float(rope.get("partial_rotary_factor", 0.25)),  # HF's default when absent, too
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=RopeScaling.from_hf(rope),
            use_parallel_residual=c.get("use_parallel_residual", True),
            norm_eps=c.get("layer_norm_eps", 1e-5),
            hidden_act=c.get("hidden_act", "gelu"),
            attention_bias=c.get("attention_bias", True),
            max_seq_len=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            torch_dtype=c.get("dtype") or c.get("torch_dtype"),
        )


class Attention(nn.Module):
    def __init__(self, cfg: GPTNeoXConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.head_dim = layer, cfg.n_heads, cfg.head_dim
        self.query = nn.Linear(cfg.dim, cfg.dim, bias=cfg.attention_bias)
        self.key = nn.Linear(cfg.dim, cfg.dim, bias=cfg.attention_bias)
        self.value = nn.Linear(cfg.dim, cfg.dim, bias=cfg.attention_bias)
        self.dense = nn.Linear(cfg.dim, cfg.dim, bias=cfg.attention_bias)
        self.qkv = SameInput("query", "key", "value")
        self.attend = ScaledDotProductAttention()

    def forward(self, x, cos, sin, positions, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.qkv(self, x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        # cos, sin cover only the first rotary_dim dims of a head; apply_rotary leaves the rest as they are.
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            k_pos = positions
        else:
            k, v = cache.update(self.layer, k, v, positions)  # (B, n_heads, S, hd)
            k_pos = torch.arange(k.shape[2], device=x.device)  # slot j holds position j
        y = self.attend(q, k, v, causal_mask(positions, k_pos))
        return self.dense(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class MLP(nn.Module):
    def __init__(self, cfg: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.act = gelu(cfg.hidden_act)
        self.dense_4h_to_h = nn.Linear(cfg.hidden_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, cfg: GPTNeoXConfig, layer: int):
        super().__init__()
        self.use_parallel_residual = cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.post_attention_layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, cache):
        attn = self.attention(self.input_layernorm(x), cos, sin, positions, cache)
        if self.use_parallel_residual:  # both branches read x: x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        h = x + attn  # sequential: the MLP reads the attention's output
        return h + self.mlp(self.post_attention_layernorm(h))


class GPTNeoX(nn.Module):
    def __init__(self, cfg: GPTNeoXConfig):
        super().__init__()
        self.config = cfg
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.n_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.embed_out = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.embed_out.weight = self.embed_in.weight

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """tokens (B, T) -> final normed hidden states (B, T, dim).

        positions (B, T): each token's position in its own sequence (default 0..T-1). With a cache,
        keys and values are stored at those positions and every earlier one is attended to.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        h = self.embed_in(tokens)  # (B, T, dim)
        cos, sin = self.rotary(positions, h.dtype)  # (B, T, rotary_dim) each
        for layer in self.layers:
            h = layer(h, cos, sin, positions, cache)
        return self.final_layer_norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., dim) -> next-token logits (..., vocab_size)."""
        return self.embed_out(h)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(tokens, positions, cache))

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, static: bool = False,
                  dtype: torch.dtype | None = None, device=None) -> KVCache:
        """An empty KV cache sized for this model (see `layers/kv_cache.py`)."""
        p = self.embed_in.weight  # never quantized: the dtype and device of the activations
        return new_cache(self.config, batch_size, max_seq_len, static, dtype or p.dtype, device or p.device)
