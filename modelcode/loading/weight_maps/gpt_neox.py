"""GPT-NeoX weight map (Hugging Face layout: Pythia, GPT-NeoX-20B, RedPajama-INCITE)."""

import torch

from modelcode.loading.weight_maps import Rule


def split_qkv(t: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split GPT-NeoX's fused `query_key_value` weight (3 * dim, dim) or bias (3 * dim,) into q, k, v.

    The fused rows are grouped by head, not by q/k/v: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], each block
    head_dim rows (Megatron's layout, which HF reads with `.view(..., n_heads, 3 * head_dim)`). A plain
    `chunk(3)` would mix heads; we view the rows as (n_heads, 3, head_dim) and take each of the three.
    """
    rows = t.view(cfg.n_heads, 3, cfg.head_dim, *t.shape[1:])  # (n_heads, 3, hd[, dim])
    q, k, v = (rows[:, i].reshape(cfg.dim, *t.shape[1:]) for i in range(3))  # (dim[, dim]) each
    return q, k, v


QKV_WEIGHTS = ("layers.{}.attention.query.weight", "layers.{}.attention.key.weight", "layers.{}.attention.value.weight")
QKV_BIASES = ("layers.{}.attention.query.bias", "layers.{}.attention.key.bias", "layers.{}.attention.value.bias")

HF: dict = {
    "gpt_neox.embed_in.weight": "embed_in.weight",
    "gpt_neox.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "gpt_neox.layers.{}.input_layernorm.bias": "layers.{}.input_layernorm.bias",
    "gpt_neox.layers.{}.attention.query_key_value.weight": Rule(QKV_WEIGHTS, split_qkv),
    "gpt_neox.layers.{}.attention.query_key_value.bias": Rule(QKV_BIASES, split_qkv),
    "gpt_neox.layers.{}.attention.dense.weight": "layers.{}.attention.dense.weight",
    "gpt_neox.layers.{}.attention.dense.bias": "layers.{}.attention.dense.bias",
    # Buffers that older checkpoints saved: the causal mask, its fill value and the rotary table.
    "gpt_neox.layers.{}.attention.bias": None,
    "gpt_neox.layers.{}.attention.masked_bias": None,
    "gpt_neox.layers.{}.attention.rotary_emb.inv_freq": None,
    "gpt_neox.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
    "gpt_neox.layers.{}.post_attention_layernorm.bias": "layers.{}.post_attention_layernorm.bias",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight": "layers.{}.mlp.dense_h_to_4h.weight",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h.bias": "layers.{}.mlp.dense_h_to_4h.bias",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight": "layers.{}.mlp.dense_4h_to_h.weight",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h.bias": "layers.{}.mlp.dense_4h_to_h.bias",
    "gpt_neox.final_layer_norm.weight": "final_layer_norm.weight",
    "gpt_neox.final_layer_norm.bias": "final_layer_norm.bias",
    "embed_out.weight": "embed_out.weight",
    "lm_head.weight": "embed_out.weight",  # the name transformers 5 uses in memory, should a file carry it
}
