"""Llama-family weight maps: Hugging Face layout and Meta's `consolidated.*.pth` layout."""

import torch

from modelcode.loading.weight_maps import Rule

HF: dict = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attention.wo.bias",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,  # old checkpoints saved the derived table
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.gate_proj.bias": "layers.{}.feed_forward.w1.bias",
    "model.layers.{}.mlp.down_proj.bias": "layers.{}.feed_forward.w2.bias",
    "model.layers.{}.mlp.up_proj.bias": "layers.{}.feed_forward.w3.bias",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def meta_to_hf_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (x0, x1), (x2, x3)...; HF rotates the halves (x0, x_d/2)...
    Reorder each head's output rows from the first layout to the second."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `meta_to_hf_rope`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


META: dict = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "layers.{}.attention_norm.weight": "layers.{}.attention_norm.weight",
    "layers.{}.attention.wq.weight": Rule(("layers.{}.attention.wq.weight",),
                                          lambda w, cfg: meta_to_hf_rope(w, cfg.n_heads)),
    "layers.{}.attention.wk.weight": Rule(("layers.{}.attention.wk.weight",),
                                          lambda w, cfg: meta_to_hf_rope(w, cfg.n_kv_heads)),
    "layers.{}.attention.wv.weight": "layers.{}.attention.wv.weight",
    "layers.{}.attention.wo.weight": "layers.{}.attention.wo.weight",
    "layers.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "layers.{}.feed_forward.w1.weight": "layers.{}.feed_forward.w1.weight",
    "layers.{}.feed_forward.w2.weight": "layers.{}.feed_forward.w2.weight",
    "layers.{}.feed_forward.w3.weight": "layers.{}.feed_forward.w3.weight",
    "norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "rope.freqs": None,  # Llama 2's derived rotary table
}

# Meta's model-parallel shards (consolidated.00.pth, .01.pth ...) split each matrix along one dim:
# column-parallel layers along their outputs (0), row-parallel ones along their inputs (1).
META_SHARD_DIM: dict = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def merge_meta_shards(name: str, parts: list[torch.Tensor], vocab_size: int | None) -> torch.Tensor:
    if parts[0].dim() == 1:  # norms are replicated on every shard
        return parts[0]
    if name == "tok_embeddings.weight":  # Llama 2 splits the embedding by dim, Llama 3 by vocabulary
        return torch.cat(parts, dim=1 if parts[0].shape[0] == vocab_size else 0)
    return torch.cat(parts, dim=META_SHARD_DIM[name.split(".")[-2]])
