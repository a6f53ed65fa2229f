"""Our Llama-family model equals Hugging Face transformers on the same weights (float32, 1e-4)."""

import pytest
import torch
from hf_reference import LLAMA_VARIANTS, random_prompts, save_bin, tiny_hf_model

import modelcode

FORMATS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded"]


def save(hf_model, folder, fmt):
    if fmt == "safetensors":
        hf_model.save_pretrained(folder)
    elif fmt == "safetensors-sharded":
        hf_model.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").exists()
    else:
        save_bin(hf_model, folder, shards=2 if fmt == "bin-sharded" else 1)
    return folder


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_logits_equal_transformers(variant, fmt, tmp_path):
    hf = tiny_hf_model(variant)
    lm = modelcode.load(save(hf, tmp_path / variant, fmt), dtype=torch.float32)
    tokens = random_prompts(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = lm.model(tokens)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_variants_really_differ(tmp_path):
    """The config fields reach the model: a sliding window or biases change the logits."""
    lm = modelcode.load(save(tiny_hf_model("mistral-sliding-window"), tmp_path / "m", "safetensors"))
    assert lm.config.sliding_window == 4
    qwen = modelcode.load(save(tiny_hf_model("qwen2-qkv-bias"), tmp_path / "q", "safetensors"))
    assert qwen.config.qkv_bias and not qwen.config.o_bias
    assert qwen.model.layers[0].attention.wq.bias is not None and qwen.model.layers[0].attention.wo.bias is None
    tied = modelcode.load(save(tiny_hf_model("tied-embeddings"), tmp_path / "t", "safetensors"))
    assert tied.model.output.weight is tied.model.tok_embeddings.weight
    assert sum(p.numel() for p in tied.model.parameters()) == sum(p.numel() for p in tiny_hf_model(
        "tied-embeddings").parameters())


def test_sliding_window_changes_logits(tmp_path):
    lm = modelcode.load(save(tiny_hf_model("mistral-sliding-window"), tmp_path / "m", "safetensors"))
    tokens = random_prompts(lm.config.vocab_size)
    with torch.no_grad():
        windowed = lm.model(tokens)
        for layer in lm.model.layers:
            layer.attention.sliding_window = None
        full = lm.model(tokens)
    torch.testing.assert_close(windowed[:, :4], full[:, :4])  # inside the window: the same
    assert not torch.allclose(windowed[:, 4:], full[:, 4:], atol=1e-3)
