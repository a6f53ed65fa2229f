"""BERT weight map (Hugging Face layout: BertModel, BertForMaskedLM, BertForPreTraining).

The pooler and the masked-LM head are optional: bert-base-uncased's own files carry both (and the
next-sentence head) while its config.json says BertForMaskedLM, so each is loaded only when the
config builds it."""

from modelcode.loading.weight_maps import optional

ENCODER: dict = {
    "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
    "embeddings.position_ids": None,  # the derived 0..511 buffer, saved by transformers 4
    "encoder.layer.{}.attention.self.query.weight": "layers.{}.attention.query.weight",
    "encoder.layer.{}.attention.self.query.bias": "layers.{}.attention.query.bias",
    "encoder.layer.{}.attention.self.key.weight": "layers.{}.attention.key.weight",
    "encoder.layer.{}.attention.self.key.bias": "layers.{}.attention.key.bias",
    "encoder.layer.{}.attention.self.value.weight": "layers.{}.attention.value.weight",
    "encoder.layer.{}.attention.self.value.bias": "layers.{}.attention.value.bias",
    "encoder.layer.{}.attention.output.dense.weight": "layers.{}.attention.dense.weight",
    "encoder.layer.{}.attention.output.dense.bias": "layers.{}.attention.dense.bias",
    "encoder.layer.{}.attention.output.LayerNorm.weight": "layers.{}.attention_norm.weight",
    "encoder.layer.{}.attention.output.LayerNorm.bias": "layers.{}.attention_norm.bias",
    "encoder.layer.{}.intermediate.dense.weight": "layers.{}.intermediate.weight",
    "encoder.layer.{}.intermediate.dense.bias": "layers.{}.intermediate.bias",
    "encoder.layer.{}.output.dense.weight": "layers.{}.output.weight",
    "encoder.layer.{}.output.dense.bias": "layers.{}.output.bias",
    "encoder.layer.{}.output.LayerNorm.weight": "layers.{}.output_norm.weight",
    "encoder.layer.{}.output.LayerNorm.bias": "layers.{}.output_norm.bias",
    "pooler.dense.weight": optional("pooler.weight"),
    "pooler.dense.bias": optional("pooler.bias"),
}

HEADS: dict = {
    "cls.predictions.transform.dense.weight": optional("mlm.dense.weight"),
    "cls.predictions.transform.dense.bias": optional("mlm.dense.bias"),
    "cls.predictions.transform.LayerNorm.weight": optional("mlm.norm.weight"),
    "cls.predictions.transform.LayerNorm.bias": optional("mlm.norm.bias"),
    "cls.predictions.decoder.weight": optional("mlm.decoder.weight"),  # absent when tied to the word embedding
    "cls.predictions.decoder.bias": optional("mlm.decoder.bias"),
    "cls.predictions.bias": optional("mlm.bias"),  # the decoder bias itself when tied (see models/bert.py)
    "cls.seq_relationship.weight": None,  # BertForPreTraining's next-sentence head: not used here
    "cls.seq_relationship.bias": None,
}

# A task model (BertForMaskedLM, ...) nests the encoder under "bert."; a saved BertModel has no prefix.
NAMES: dict = {**ENCODER, **{"bert." + k: v for k, v in ENCODER.items()}, **HEADS}


def tf_names(names: dict) -> dict:
    """Checkpoints converted from Google's TensorFlow release (bert-base-uncased's own files) call the
    LayerNorm parameters gamma and beta."""
    return {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in names.items() if "LayerNorm." in k}


HF: dict = {**tf_names(NAMES), **NAMES}
