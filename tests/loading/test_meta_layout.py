"""Meta's consolidated.*.pth + params.json layout loads to the same model as the HF folder."""

import json

import pytest
import torch
from hf_reference import random_prompts, tiny_hf_model

import modelcode
from modelcode.loading.weight_maps import llama as maps
from modelcode.loading.weight_maps.llama import META_SHARD_DIM, hf_to_meta_rope


def to_meta(hf_state: dict, n_heads: int, n_kv_heads: int) -> dict:
    """The inverse of the weight map: HF names and rotary layout -> Meta's."""
    out = {}
    for hf_pattern, ours in maps.HF.items():
        if ours is None:
            continue
        for layer in range(2) if "{}" in hf_pattern else [None]:
            name = hf_pattern.replace("{}", str(layer))
            if name not in hf_state:
                continue
            w = hf_state[name]
            if ours.endswith("wq.weight"):
                w = hf_to_meta_rope(w, n_heads)
            elif ours.endswith("wk.weight"):
                w = hf_to_meta_rope(w, n_kv_heads)
            out[ours.replace("{}", str(layer))] = w.clone()
    return out


def shard(state: dict, n: int) -> list[dict]:
    """Split as Meta's model-parallel training did (Llama 3: embedding split by vocabulary)."""
    parts = [{} for _ in range(n)]
    for name, w in state.items():
        kind = name.split(".")[-2]
        dim = 0 if name == "tok_embeddings.weight" else META_SHARD_DIM.get(kind)
        for i, piece in enumerate(w.chunk(n, dim) if dim is not None and w.dim() == 2 else [w] * n):
            parts[i][name] = piece.clone()
    return parts


@pytest.mark.parametrize("n_shards", [1, 2])
def test_consolidated_pth_equals_hf_folder(tmp_path, n_shards):
    hf = tiny_hf_model("llama3-gqa")
    hf.save_pretrained(tmp_path / "hf")
    meta = tmp_path / "meta"
    meta.mkdir()
    c = hf.config
    state = to_meta(hf.state_dict(), c.num_attention_heads, c.num_key_value_heads)
    for i, part in enumerate(shard(state, n_shards)):
        torch.save(part, meta / f"consolidated.{i:02d}.pth")
    (meta / "params.json").write_text(json.dumps(dict(
        dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, multiple_of=32, ffn_dim_multiplier=None,
        norm_eps=c.rms_norm_eps, rope_theta=500000.0, use_scaled_rope=False)))

    tokens = random_prompts(c.vocab_size)
    with torch.no_grad():
        ours_meta = modelcode.load(meta).model(tokens)
        ours_hf = modelcode.load(tmp_path / "hf").model(tokens)
        expected = hf(tokens).logits
    torch.testing.assert_close(ours_meta, ours_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_meta, expected, atol=1e-4, rtol=1e-4)


def test_meta_ffn_width_from_params():
    from modelcode.models.llama import LlamaConfig

    # Llama 3 8B: dim 4096, ffn_dim_multiplier 1.3, multiple_of 1024 -> 14336.
    cfg = LlamaConfig.from_meta(dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                     multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=5e5))
    assert cfg.hidden_dim == 14336
    # Llama 2 7B: no multiplier, multiple_of 256 -> 11008.
    cfg = LlamaConfig.from_meta(dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5,
                                     vocab_size=-1), vocab_size=32000)
    assert (cfg.hidden_dim, cfg.vocab_size) == (11008, 32000)
