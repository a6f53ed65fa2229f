"""Marian weight map: Hugging Face `MarianMTModel` checkpoints (the opus-mt models) -> `models/transformer.py`."""

from modelcode.loading.weight_maps import Rule


def squeeze_row(t, config):
    """final_logits_bias is stored as a (1, vocab) row; ours is the output layer's (vocab,) bias."""
    return t.reshape(-1)


# Inside the layers our names are the checkpoint's, less the "model." prefix; each has a weight and a bias.
ENCODER_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")
DECODER_LAYER = (*ENCODER_LAYER, "encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj",
                 "encoder_attn.out_proj", "encoder_attn_layer_norm")

HF: dict = {
    # One matrix when the vocabularies are shared: stored once as `shared`, or (older files) repeated
    # under every name that ties to it; the loader keeps the first copy of a tied weight.
    "model.shared.weight": "encoder.embed_tokens.weight",
    "model.encoder.embed_tokens.weight": "encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight": "decoder.embed_tokens.weight",
    "lm_head.weight": "lm_head.weight",
    "final_logits_bias": Rule(("lm_head.bias",), squeeze_row),
    # Sinusoidal tables that some conversions saved: derived from the config, rebuilt on load.
    "model.encoder.embed_positions.weight": None,
    "model.decoder.embed_positions.weight": None,
    **{f"model.{side}.layers.{{}}.{module}.{kind}": f"{side}.layers.{{}}.{module}.{kind}"
       for side, modules in (("encoder", ENCODER_LAYER), ("decoder", DECODER_LAYER))
       for module in modules for kind in ("weight", "bias")},
}
