"""The Transformer of "Attention Is All You Need" (Vaswani et al. 2017, arXiv:1706.03762): an encoder-
decoder for translation, and Marian (Junczys-Dowmunt et al. 2018), its direct descendant, whose opus-mt
checkpoints (Tiedemann & Thottingal 2020) Hugging Face ships as `MarianMTModel`.

The encoder reads the whole source at once; the decoder writes the target one token at a time, each
position attending to the earlier target positions (causal self-attention) and to every encoder output
(cross-attention). As in the paper: sinusoidal positions added to embeddings scaled by sqrt(d_model),
post-LayerNorm sublayers (x = norm(x + sublayer(x))), and, in Marian's checkpoints, one embedding matrix
shared by the source, the target and the output projection. Marian adds a bias to the output logits
(`final_logits_bias`) and uses swish instead of ReLU. Names follow the Marian checkpoints.

The model holds no decoding state: `encode` runs once per source, then `decode` is called with a
`DecoderCache` that keeps the target-side keys/values and the encoder's cross-attention keys/values.
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from modelcode.errors import UnsupportedModelError
from modelcode.layers import ContiguousKVCache, attend, causal_mask, padding_mask

# HF `activation_function` names. The paper used ReLU; Marian's opus-mt models use swish (= SiLU).
ACTIVATIONS = {"relu": F.relu, "swish": F.silu, "silu": F.silu, "gelu": F.gelu,
               "gelu_new": partial(F.gelu, approximate="tanh"),
               "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


@dataclass
class TransformerConfig:
    vocab_size: int  # source vocabulary; also the target's when target_vocab_size is None
    dim: int  # d_model
    n_encoder_layers: int
    n_decoder_layers: int
    n_heads: int
    hidden_dim: int  # the feed-forward's inner width (d_ff)
    n_decoder_heads: int | None = None  # None: n_heads
    decoder_hidden_dim: int | None = None  # None: hidden_dim
    target_vocab_size: int | None = None  # None: vocab_size
    share_embeddings: bool = True  # source and target embeddings are one matrix (needs one vocabulary)
    tie_output: bool = True  # the output projection is the target embedding (Press & Wolf 2017)
    output_bias: bool = True  # Marian's final_logits_bias
    scale_embedding: bool = True  # embeddings * sqrt(dim), so they are not drowned by the positions
    activation: str = "relu"
    max_seq_len: int = 512  # positions per sequence, source and target each
    norm_eps: float = 1e-5
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int | None = None  # the first decoder input; None: pad_id, as Marian does
    torch_dtype: str | None = None

    def __post_init__(self):
        self.n_decoder_heads = self.n_decoder_heads or self.n_heads
        self.decoder_hidden_dim = self.decoder_hidden_dim or self.hidden_dim
        self.target_vocab_size = self.target_vocab_size or self.vocab_size
        self.decoder_start_id = self.pad_id if self.decoder_start_id is None else self.decoder_start_id
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported: use one of {', '.join(ACTIVATIONS)}")
        if self.dim % 2:
            raise ValueError(f"d_model={self.dim} must be even for sinusoidal positions")
        if self.share_embeddings and self.target_vocab_size != self.vocab_size:
            raise ValueError(f"shared embeddings need one vocabulary, got {self.vocab_size} source and "
                             f"{self.target_vocab_size} target tokens")

    @classmethod
    def from_hf(cls, c: dict) -> "TransformerConfig":
        """From a Hugging Face Marian `config.json` (model_type "marian")."""
        # Configs converted in 2020 still carry BART-era switches. Marian checkpoints are post-LN with
        # static sinusoids and no extra norms, which is what this file implements; say so if a config
        # asks for something else rather than silently computing a different function.
        for key, wanted in (("normalize_before", False), ("normalize_embedding", False),
                            ("add_final_layer_norm", False), ("static_position_embeddings", True)):
            if bool(c.get(key, wanted)) != wanted:
                raise UnsupportedModelError(f"config.json sets {key}={c[key]!r}; Marian checkpoints (and this "
                                            f"model) use {key}={wanted}")
        # transformers 5 ties all three matrices (source, target, output) only when tie_word_embeddings
        # holds; without it each is its own (and a stored `model.shared` goes unused).
        tied = c.get("tie_word_embeddings", True)
        share = c.get("share_encoder_decoder_embeddings", True) and tied
        return cls(
            vocab_size=c["vocab_size"],
            target_vocab_size=None if share else c.get("decoder_vocab_size"),
            dim=c["d_model"],
            n_encoder_layers=c["encoder_layers"],
            n_decoder_layers=c["decoder_layers"],
            n_heads=c["encoder_attention_heads"],
            n_decoder_heads=c["decoder_attention_heads"],
            hidden_dim=c["encoder_ffn_dim"],
            decoder_hidden_dim=c["decoder_ffn_dim"],
            share_embeddings=share,
            tie_output=tied,
            output_bias=True,
            scale_embedding=c.get("scale_embedding", False),
            activation=c.get("activation_function", "gelu"),
            max_seq_len=c.get("max_position_embeddings", 1024),
            pad_id=c["pad_token_id"],
            eos_id=c["eos_token_id"],
            decoder_start_id=c.get("decoder_start_token_id"),
            torch_dtype=c.get("dtype") or c.get("torch_dtype"),
        )


class SinusoidalPositions(nn.Module):
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    Marian stores the same numbers with all the sines first and all the cosines second instead of
    interleaved; the model learned with that layout, so we build it. Fixed, not learned: a buffer.
    """

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        self.max_seq_len, self.dim = max_seq_len, dim
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the table; the loader calls this after building the model on the meta device."""
        inv_freq = 10000.0 ** (-torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)  # (dim / 2,)
        angles = torch.arange(self.max_seq_len, dtype=torch.float64)[:, None] * inv_freq  # (max_seq_len, dim / 2)
        self.register_buffer("table", torch.cat((angles.sin(), angles.cos()), dim=-1).float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]  # (B, T, dim)


class Attention(nn.Module):
    """Multi-head attention. Queries come from x; keys and values from `keys_values(source)`, where the
    source is x itself (self-attention) or the encoder output (cross-attention)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.k_proj(source)), self.split_heads(self.v_proj(source))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None):
        y = attend(self.split_heads(self.q_proj(x)), *kv, mask)  # (B, n_heads, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(x.shape))  # (B, T, dim)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = Attention(cfg.dim, cfg.n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim)
        self.act = ACTIVATIONS[cfg.activation]
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, self.self_attn.keys_values(x), mask))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class DecoderCache:
    """What decoding reuses from step to step, for every decoder layer: the self-attention keys and
    values of the target positions already decoded (they grow by one per step), and the cross-
    attention keys and values of the encoder output (computed at the first step: they depend on the
    source only)."""

    def __init__(self, n_layers: int):
        self.self_attn = ContiguousKVCache(n_layers)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    def cross_kv(self, layer: int, attn: Attention, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cross[layer] is None:
            self.cross[layer] = attn.keys_values(memory)
        return self.cross[layer]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the target-side rows `rows`, in that order: in beam search each surviving beam goes on
        from the cache of the beam it extends. That beam translates the same source, so the cross-
        attention rows, equal for all beams of a source, stay as they are."""
        for kvs in (self.self_attn.k, self.self_attn.v):
            kvs[:] = [None if t is None else t.index_select(0, rows) for t in kvs]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.self_attn = Attention(cfg.dim, cfg.n_decoder_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.encoder_attn = Attention(cfg.dim, cfg.n_decoder_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.decoder_hidden_dim)
        self.fc2 = nn.Linear(cfg.decoder_hidden_dim, cfg.dim)
        self.act = ACTIVATIONS[cfg.activation]
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, positions, memory, memory_mask, cache: DecoderCache | None):
        k, v = self.self_attn.keys_values(x)
        k_pos = positions
        if cache is not None:
            k, v = cache.self_attn.update(self.layer, k, v, positions)  # (B, n_heads, S, hd)
            k_pos = torch.arange(k.shape[2], device=x.device)  # slot j holds position j
        x = self.self_attn_layer_norm(x + self.self_attn(x, (k, v), causal_mask(positions, k_pos)))
        if cache is None:
            kv = self.encoder_attn.keys_values(memory)
        else:
            kv = cache.cross_kv(self.layer, self.encoder_attn, memory)  # computed at the first step only
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x, kv, memory_mask))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_positions = SinusoidalPositions(cfg.max_seq_len, cfg.dim)
        self.embed_scale = math.sqrt(cfg.dim) if cfg.scale_embedding else 1.0
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(src.shape[1], device=src.device)
        x = self.embed_tokens(src) * self.embed_scale  # (B, S, dim)
        x = x + self.embed_positions(positions).to(x.dtype)
        mask = None if src_mask is None else padding_mask(src_mask)  # no query sees a padding key
        for layer in self.layers:
            x = layer(x, mask)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.target_vocab_size, cfg.dim)
        self.embed_positions = SinusoidalPositions(cfg.max_seq_len, cfg.dim)
        self.embed_scale = math.sqrt(cfg.dim) if cfg.scale_embedding else 1.0
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_decoder_layers))

    def forward(self, tgt, positions, memory, src_mask, cache: DecoderCache | None) -> torch.Tensor:
        x = self.embed_tokens(tgt) * self.embed_scale  # (B, T, dim)
        x = x + self.embed_positions(positions).to(x.dtype)
        memory_mask = None if src_mask is None else padding_mask(src_mask)
        for layer in self.layers:
            x = layer(x, positions, memory, memory_mask, cache)
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.share_embeddings:
            self.decoder.embed_tokens = self.encoder.embed_tokens
        # For training from scratch (a checkpoint overwrites it): embeddings of std 1/sqrt(dim), so that
        # scaled by sqrt(dim) they are about as large as the sinusoids added to them; PyTorch's N(0, 1)
        # would drown the positions.
        for embedding in dict.fromkeys((self.encoder.embed_tokens, self.decoder.embed_tokens)):  # once if shared
            nn.init.normal_(embedding.weight, std=1 / self.encoder.embed_scale)
        self.lm_head = nn.Linear(cfg.dim, cfg.target_vocab_size, bias=cfg.output_bias)
        if cfg.tie_output:
            self.lm_head.weight = self.decoder.embed_tokens.weight

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) -> encoder output (B, S, dim). src_mask (B, S): 1 for tokens, 0 for padding;
        None: no padding."""
        return self.encoder(src, src_mask)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, cache: DecoderCache | None = None) -> torch.Tensor:
        """Target ids (B, T) -> next-token logits (B, T, target_vocab_size), given the encoder output.

        positions (B, T): the target positions of `tgt` (default 0..T-1). With a cache, pass only the new
        tokens: their keys/values are stored and every earlier position is attended to.
        """
        if positions is None:
            positions = torch.arange(tgt.shape[1], device=tgt.device).expand(tgt.shape)
        return self.lm_head(self.decoder(tgt, positions, memory, src_mask, cache))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: source (B, S) and target inputs (B, T) -> logits (B, T, target_vocab_size);
        logits[:, t] predicts the target token after tgt[:, t]."""
        return self.decode(tgt, self.encode(src, src_mask), src_mask)

    def new_cache(self) -> DecoderCache:
        return DecoderCache(self.config.n_decoder_layers)
