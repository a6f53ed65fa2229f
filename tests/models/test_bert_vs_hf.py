"""Our BERT equals Hugging Face transformers on the same weights (float32, 1e-4): masked-LM logits, hidden
states and the pooler, on padded batches with an attention mask; the heads follow config.json."""

import json

import pytest
import torch
import transformers
from hf_reference import save_bin

import modelcode
from modelcode.errors import CheckpointError

BASE = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=24, type_vocab_size=2)


def tiny_bert(kind: str = "BertForMaskedLM", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random BERT of `kind` (a transformers class name); every weight drawn, biases and norms too."""
    config = transformers.BertConfig(**{**BASE, **overrides}, architectures=[kind])  # save_bin writes no other
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, kind)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    return model


def padded_batch(vocab_size: int, lengths=(11, 7, 3), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random tokens (B, T) and their 0/1 attention mask; the padding holds random ids too,
    so a mask that leaked would show."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return tokens, mask


def assert_real_tokens_close(actual, expected, mask):
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_masked_lm_logits_equal_transformers(fmt, tied, tmp_path):
    hf = tiny_bert("BertForMaskedLM", tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path) if fmt == "safetensors" else save_bin(hf, tmp_path)
    enc = modelcode.load(tmp_path, dtype=torch.float32)
    assert enc.model.mlm is not None and enc.model.pooler is None
    assert (enc.model.mlm.decoder.weight is enc.model.embeddings.word_embeddings.weight) == tied
    tokens, mask = padded_batch(hf.config.vocab_size)
    types = torch.randint(0, 2, tokens.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens, attention_mask=mask, token_type_ids=types).logits
        actual = enc.model.logits(enc.model(tokens, mask, types))
    assert_real_tokens_close(actual, expected, mask)


def test_encoder_and_pooler_equal_transformers(tmp_path):
    hf = tiny_bert("BertModel")
    hf.save_pretrained(tmp_path)  # a bare BertModel: tensor names without the "bert." prefix
    enc = modelcode.load(tmp_path)
    assert enc.model.mlm is None and enc.model.pooler is not None
    tokens, mask = padded_batch(hf.config.vocab_size, seed=2)
    with torch.no_grad():
        out = hf(tokens, attention_mask=mask)
        h = enc.model(tokens, mask)
        pooled = enc.model.pooled(h)
    assert_real_tokens_close(h, out.last_hidden_state, mask)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="no masked-LM head .* load a BertForMaskedLM checkpoint"):
        enc.model.logits(h)


def test_pretraining_checkpoint_with_tensorflow_names(tmp_path):
    """BertForPreTraining (pooler + MLM head; its next-sentence head is skipped) saved with the gamma/beta
    LayerNorm names of checkpoints converted from Google's TensorFlow release, like bert-base-uncased."""
    hf = tiny_bert("BertForPreTraining")
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}
    assert any(k.endswith("LayerNorm.gamma") for k in state) and "cls.seq_relationship.weight" in state
    hf.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    enc = modelcode.load(tmp_path)
    tokens, mask = padded_batch(hf.config.vocab_size, seed=3)
    with torch.no_grad():
        out = hf(tokens, attention_mask=mask)
        h = enc.model(tokens, mask)
        assert_real_tokens_close(enc.model.logits(h), out.prediction_logits, mask)
    bert = transformers.BertModel(hf.config).eval()
    bert.load_state_dict(hf.bert.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(enc.model.pooled(h), bert(tokens, attention_mask=mask).pooler_output,
                                   atol=1e-4, rtol=1e-4)


def test_padding_is_invisible(tmp_path):
    """A text's states do not depend on what else is in its batch, nor on the ids under its padding."""
    tiny_bert("BertModel").save_pretrained(tmp_path)
    enc = modelcode.load(tmp_path)
    tokens, mask = padded_batch(BASE["vocab_size"], lengths=(9, 4))
    with torch.no_grad():
        batched = enc.model(tokens, mask)
        alone = enc.model(tokens[1:, :4])
    torch.testing.assert_close(batched[1, :4], alone[0], atol=1e-5, rtol=1e-5)


def test_bad_configs_and_inputs_are_named(tmp_path):
    hf = tiny_bert("BertForSequenceClassification")
    hf.save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match=r"architectures \['BertForSequenceClassification'\] .* not supported"):
        modelcode.load(tmp_path / "cls")
    tiny_bert("BertModel").save_pretrained(tmp_path / "rel")
    config = json.loads((tmp_path / "rel" / "config.json").read_text())
    (tmp_path / "rel" / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))
    with pytest.raises(ValueError, match="position_embedding_type='relative_key' is not supported"):
        modelcode.load(tmp_path / "rel")
    tiny_bert("BertModel").save_pretrained(tmp_path / "ok")
    enc = modelcode.load(tmp_path / "ok")
    with pytest.raises(ValueError, match="25 tokens, but this BERT has learned positions for only 24"):
        enc.model(torch.ones(1, 25, dtype=torch.long))
    # A BertModel file whose config says BertForMaskedLM: the head the config asks for is missing.
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(CheckpointError, match=r"missing .*'mlm\.dense\.weight'"):
        modelcode.load(tmp_path / "ok")


def test_bert_base_uncased_layout_loads(tmp_path):
    """bert-base-uncased's files hold pooler, masked-LM and next-sentence heads, but its config.json says
    BertForMaskedLM: the heads the config builds are loaded, the others skipped."""
    hf = tiny_bert("BertForPreTraining")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    enc = modelcode.load(tmp_path)
    assert enc.model.pooler is None and enc.model.mlm is not None
    tokens, mask = padded_batch(BASE["vocab_size"], lengths=(9, 4))
    with torch.no_grad():
        ours = enc.model.logits(enc.model(tokens, mask))
        expected = hf(tokens, attention_mask=mask).prediction_logits
    torch.testing.assert_close(ours[0], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[1, :4], expected[1, :4], atol=1e-4, rtol=1e-4)
