"""BERT (Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", arXiv:1810.04805), and the many encoders of its shape: MiniLM, the sentence-transformers
embedders (all-MiniLM-L6-v2, ...), BGE.

An encoder: every token sees every other non-padding token, in both directions. Positions are learned
embeddings added at the input with a token-type ("segment A or B") embedding; each block is the
original Transformer's post-LayerNorm one, x = LN(x + sublayer(x)), with a GELU feed-forward. On top,
depending on the checkpoint: a pooler (tanh of a linear map of the first, [CLS], token) and a
masked-LM head that predicts the token behind each [MASK] with the word embedding as output matrix.
Names follow the checkpoints (`word_embeddings`, `query`, `intermediate`...), shortened where HF nests
them (`encoder.layer.0.attention.self.query` is `layers.0.attention.query`).
"""

from dataclasses import dataclass

import torch
from torch import nn

from modelcode.layers import attend, padding_mask
from modelcode.layers.activation import gelu

# config.json `architectures` -> (has a pooler, has the masked-LM head), as transformers builds them.
HEADS = {
    "BertModel": (True, False),
    "BertForMaskedLM": (False, True),
    "BertForPreTraining": (True, True),  # its next-sentence head is skipped on loading
}


@dataclass
class BertConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int  # the feed-forward's inner width ("intermediate_size")
    max_seq_len: int = 512  # number of learned positions
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pooler: bool = True
    mlm_head: bool = False
    tie_word_embeddings: bool = True  # the masked-LM head's output matrix is the word embedding
    torch_dtype: str | None = None

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"hidden_size={self.dim} is not a multiple of num_attention_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_hf(cls, c: dict) -> "BertConfig":
        """From a Hugging Face `config.json` (model_type bert); the heads follow `architectures`."""
        architectures = c.get("architectures") or ["BertModel"]
        unknown = [a for a in architectures if a not in HEADS]
        if unknown:
            raise ValueError(f"architectures {unknown} in config.json are not supported for BERT; supported: "
                             f"{', '.join(HEADS)} (the encoder, pooler and masked-LM head)")
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type={c['position_embedding_type']!r} is not supported: "
                             "only BERT's learned 'absolute' positions")
        if c.get("is_decoder") or c.get("add_cross_attention"):
            raise ValueError("config.json describes a BERT decoder (is_decoder / add_cross_attention): only the "
                             "bidirectional encoder is supported")
        pooler = any(HEADS[a][0] for a in architectures)
        mlm_head = any(HEADS[a][1] for a in architectures)
        return cls(
            vocab_size=c["vocab_size"],
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            hidden_dim=c["intermediate_size"],
            max_seq_len=c.get("max_position_embeddings", 512),
            type_vocab_size=c.get("type_vocab_size", 2),
            norm_eps=c.get("layer_norm_eps", 1e-12),
            hidden_act=c.get("hidden_act", "gelu"),
            pooler=pooler,
            mlm_head=mlm_head,
            tie_word_embeddings=c.get("tie_word_embeddings", True),
            torch_dtype=c.get("dtype") or c.get("torch_dtype"),
        )


class Embeddings(nn.Module):
    """word + learned position + token type, then LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, tokens: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # right padding: 0..T-1 for every row
        x = self.word_embeddings(tokens) + self.position_embeddings(positions) + self.token_type_embeddings(
            token_type_ids)
        return self.norm(x)  # (B, T, dim)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)
        self.dense = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
                   for proj in (self.query, self.key, self.value))
        y = attend(q, k, v, mask)  # no causal mask: every token sees the whole (unpadded) text
        return self.dense(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.intermediate = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.act = gelu(cfg.hidden_act)
        self.output = nn.Linear(cfg.hidden_dim, cfg.dim)
        self.output_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # Post-LN: the norm comes after each residual sum (pre-LN models put it before the sublayer).
        x = self.attention_norm(x + self.attention(x, mask))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


class MaskedLMHead(nn.Module):
    """dense + GELU + LayerNorm, then scores over the vocabulary (a bias per token)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.act = gelu(cfg.hidden_act)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.decoder = nn.Linear(cfg.dim, cfg.vocab_size)
        # Checkpoints store the per-token bias as `bias` and, untied, also as the decoder's own bias; tied
        # (the usual case) they are one tensor. Untied, transformers applies the decoder's, and so do we.
        self.bias = self.decoder.bias if cfg.tie_word_embeddings else nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.pooler = nn.Linear(cfg.dim, cfg.dim) if cfg.pooler else None
        self.mlm = MaskedLMHead(cfg) if cfg.mlm_head else None
        if self.mlm is not None and cfg.tie_word_embeddings:
            self.mlm.decoder.weight = self.embeddings.word_embeddings.weight

    def hidden_states(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> the last layer's hidden states (B, T, dim).

        attention_mask (B, T): 1 for real tokens, 0 for padding (right-padded rows); default all 1.
        token_type_ids (B, T): 0 for the first segment, 1 for the second; default all 0.
        """
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{tokens.shape[1]} tokens, but this BERT has learned positions for only "
                             f"{self.config.max_seq_len}: shorten or truncate the input")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(tokens)
        mask = None if attention_mask is None else padding_mask(attention_mask)  # (B, 1, 1, T)
        h = self.embeddings(tokens, token_type_ids)
        for layer in self.layers:
            h = layer(h, mask)
        return h

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """An encoder's output: the hidden states (B, T, dim). See `logits` and `pooled` for the heads."""
        return self.hidden_states(tokens, attention_mask, token_type_ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., dim) -> masked-LM scores over the vocabulary (..., vocab_size)."""
        if self.mlm is None:
            raise ValueError("this checkpoint has no masked-LM head (config.json architectures: BertModel); "
                             "load a BertForMaskedLM checkpoint to predict masked tokens")
        return self.mlm(h)

    def pooled(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, dim) -> BERT's pooled output (B, dim): tanh(W h[CLS] + b)."""
        if self.pooler is None:
            raise ValueError("this checkpoint has no pooler (BertForMaskedLM drops it); use the hidden states")
        return torch.tanh(self.pooler(h[:, 0]))
