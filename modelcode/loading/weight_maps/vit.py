"""ViT weight map: Hugging Face `ViTForImageClassification` checkpoints (as on the hub) -> `models/vit.py`."""

HF: dict = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "position_embeddings",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embeddings.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embeddings.bias",
    "vit.encoder.layer.{}.layernorm_before.weight": "layers.{}.layernorm_before.weight",
    "vit.encoder.layer.{}.layernorm_before.bias": "layers.{}.layernorm_before.bias",
    "vit.encoder.layer.{}.attention.attention.query.weight": "layers.{}.attention.query.weight",
    "vit.encoder.layer.{}.attention.attention.query.bias": "layers.{}.attention.query.bias",
    "vit.encoder.layer.{}.attention.attention.key.weight": "layers.{}.attention.key.weight",
    "vit.encoder.layer.{}.attention.attention.key.bias": "layers.{}.attention.key.bias",
    "vit.encoder.layer.{}.attention.attention.value.weight": "layers.{}.attention.value.weight",
    "vit.encoder.layer.{}.attention.attention.value.bias": "layers.{}.attention.value.bias",
    "vit.encoder.layer.{}.attention.output.dense.weight": "layers.{}.attention.output.weight",
    "vit.encoder.layer.{}.attention.output.dense.bias": "layers.{}.attention.output.bias",
    "vit.encoder.layer.{}.layernorm_after.weight": "layers.{}.layernorm_after.weight",
    "vit.encoder.layer.{}.layernorm_after.bias": "layers.{}.layernorm_after.bias",
    "vit.encoder.layer.{}.intermediate.dense.weight": "layers.{}.mlp.fc1.weight",
    "vit.encoder.layer.{}.intermediate.dense.bias": "layers.{}.mlp.fc1.bias",
    "vit.encoder.layer.{}.output.dense.weight": "layers.{}.mlp.fc2.weight",
    "vit.encoder.layer.{}.output.dense.bias": "layers.{}.mlp.fc2.bias",
    "vit.layernorm.weight": "layernorm.weight",
    "vit.layernorm.bias": "layernorm.bias",
    # The pooler (dense + tanh on the class token) belongs to ViTModel's pre-training head; the
    # classifier reads the class token directly, as transformers does, so its weights are not used.
    "vit.pooler.dense.weight": None,
    "vit.pooler.dense.bias": None,
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
