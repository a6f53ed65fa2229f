"""Our GPT-NeoX equals Hugging Face transformers' GPTNeoXForCausalLM on the same weights (float32, 1e-4):
parallel and sequential residual, partial rotary, old- and new-style config.json; cached decoding equals
the full pass; greedy generation matches transformers' token for token."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from hf_reference import assert_cached_decode_equals_full_pass, random_prompts, save_bin

import modelcode
from modelcode.errors import CheckpointError
from modelcode.loading.weight_maps.gpt_neox import split_qkv
from modelcode.models.gpt_neox import GPTNeoXConfig

BASE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=64, layer_norm_eps=1e-5)

VARIANTS = {  # head_dim 16: rotary_pct 0.25 rotates 4 dims of each head, 0.5 rotates 8
    "parallel-residual": dict(use_parallel_residual=True, rotary_pct=0.25),
    "sequential-residual": dict(use_parallel_residual=False, rotary_pct=0.5, rotary_emb_base=1000),
    "gelu-fast-no-bias": dict(hidden_act="gelu_fast", attention_bias=False, rotary_pct=0.25),
    "full-rotary-tied": dict(rotary_pct=1.0, tie_word_embeddings=True),
    "linear-rope-scaling": dict(rotary_pct=0.5, rope_scaling=dict(rope_type="linear", factor=2.0)),
}


def tiny_neox(variant: str, seed: int = 0) -> transformers.GPTNeoXForCausalLM:
    """A random GPTNeoXForCausalLM; every weight (biases and norms too) drawn so that no mapping hides."""
    overrides = dict(VARIANTS[variant])
    config = transformers.GPTNeoXConfig(**BASE, **overrides, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    return model


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(variant, fmt, tmp_path):
    hf = tiny_neox(variant)
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        save_bin(hf, tmp_path)
    lm = modelcode.load(tmp_path, dtype=torch.float32)
    tokens = random_prompts(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(tokens).logits
        actual = lm.model(tokens)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_config_fields_reach_the_model(tmp_path):
    tiny_neox("sequential-residual").save_pretrained(tmp_path / "s")
    lm = modelcode.load(tmp_path / "s")
    assert type(lm.model).__name__ == "GPTNeoX"
    assert lm.config.rotary_dim == 8 and lm.config.rope_theta == 1000 and not lm.config.use_parallel_residual
    assert lm.model.embed_out.weight is not lm.model.embed_in.weight
    tiny_neox("gelu-fast-no-bias").save_pretrained(tmp_path / "g")
    lm = modelcode.load(tmp_path / "g")
    assert lm.model.layers[0].attention.query.bias is None and lm.model.layers[0].mlp.act.approximate == "tanh"
    tiny_neox("full-rotary-tied").save_pretrained(tmp_path / "t")
    tied = modelcode.load(tmp_path / "t").model
    assert tied.embed_out.weight is tied.embed_in.weight and tied.rotary.rotary_dim == 16


def test_residual_kind_matters(tmp_path):
    """Flipping use_parallel_residual on the same weights changes the logits: the flag is really read."""
    tiny_neox("parallel-residual").save_pretrained(tmp_path)
    lm = modelcode.load(tmp_path)
    tokens = random_prompts(lm.config.vocab_size)
    with torch.no_grad():
        parallel = lm.model(tokens)
        for layer in lm.model.layers:
            layer.use_parallel_residual = False
        sequential = lm.model(tokens)
    assert not torch.allclose(parallel, sequential, atol=1e-3)


def test_pre_transformers5_config_json(tmp_path):
    """Configs written before transformers 5 (every Pythia on the hub) say rotary_pct / rotary_emb_base."""
    hf = tiny_neox("sequential-residual")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rotary_pct=0.5, rotary_emb_base=1000, torch_dtype=config.pop("dtype"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    lm = modelcode.load(tmp_path)
    assert lm.config.rotary_dim == 8 and lm.config.rope_theta == 1000
    tokens = random_prompts(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_split_qkv_takes_heads_interleaved():
    """Fused rows are [q_0 k_0 v_0 | q_1 k_1 v_1 ...] per head; a plain chunk(3) would be wrong."""
    cfg = GPTNeoXConfig(vocab_size=8, dim=4, n_layers=1, n_heads=2, hidden_dim=16)
    fused = torch.arange(12.0)  # head 0: q 0,1 k 2,3 v 4,5; head 1: q 6,7 k 8,9 v 10,11
    q, k, v = split_qkv(fused, cfg)
    assert q.tolist() == [0, 1, 6, 7] and k.tolist() == [2, 3, 8, 9] and v.tolist() == [4, 5, 10, 11]
    w = torch.arange(12.0)[:, None].expand(12, 4)
    assert [t[:, 0].tolist() for t in split_qkv(w, cfg)] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]


def test_old_buffers_skipped_and_unknown_tensor_named(tmp_path):
    """Old .bin checkpoints also hold the causal-mask buffers: skipped. A truly unknown name is an error."""
    hf = tiny_neox("parallel-residual")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    hf.config.save_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    tokens = random_prompts(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(modelcode.load(tmp_path).model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    state["gpt_neox.layers.0.attention.qkv_scale"] = torch.ones(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unknown tensor 'gpt_neox.layers.0.attention.qkv_scale'"):
        modelcode.load(tmp_path)


@pytest.fixture(scope="module", params=["parallel-residual", "sequential-residual"])
def neox(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = tiny_neox(request.param)
    hf.save_pretrained(folder)
    return hf, modelcode.load(folder)


@pytest.mark.parametrize("static", [False, True])
def test_prefill_then_decode_equals_full_pass(neox, static):
    _, lm = neox
    assert_cached_decode_equals_full_pass(lm.model, lm.config.vocab_size, static)


@pytest.mark.parametrize("variant", ["parallel-residual", "sequential-residual"])
def test_greedy_generation_equals_transformers(variant, tmp_path):
    """Batched prompts of unequal lengths through lm.generate vs transformers' generate one at a time.

    Weights redrawn (small matrices, unit-scale embedding, seed 2) so that the greedy continuations wander
    over several tokens instead of repeating one, and the top-2 logit gaps (> 1e-3) dwarf float noise."""
    hf = tiny_neox(variant)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "layernorm" in name or "layer_norm" in name else 0.0, 0.1 if p.dim() == 1 else 0.05)
        hf.gpt_neox.embed_in.weight.normal_(0, 1.0)
    hf.save_pretrained(tmp_path)
    lm = modelcode.load(tmp_path)
    prompts = [p[:n] for p, n in zip(random_prompts(hf.config.vocab_size, batch=3, length=9, seed=3).tolist(),
                                     [3, 9, 6], strict=True)]
    new = 20
    tokens, _ = lm.generate(prompts, max_new_tokens=new, temperature=0.0)
    for prompt, ours in zip(prompts, tokens, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        assert ours == out[0, len(prompt):].tolist()
    assert len({t for seq in tokens for t in seq}) > 6  # the continuations really vary


def test_pythia_shaped_folder_with_the_real_tokenizer(tmp_path):
    """A Pythia-like folder (the GPT-NeoX-20B tokenizer.json, embedding padded to 50,304 rows) loads with
    its tokenizer, and a text completion continues the way transformers does."""
    config = transformers.GPTNeoXConfig(**{**BASE, "vocab_size": 50304, "hidden_size": 32, "intermediate_size": 128},
                                        rotary_pct=0.25, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    shutil.copy(Path(__file__).parents[1] / "assets" / "tokenizers" / "gpt-neox" / "tokenizer.json", tmp_path)
    lm = modelcode.load(tmp_path)
    ids = lm.tokenizer.encode("Hello world")
    assert ids == [12092, 1533]  # tokenizer README's check
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 2, dtype=torch.long), max_new_tokens=8,
                          do_sample=False, pad_token_id=1)[0, 2:].tolist()
    if 0 in out:  # <|endoftext|> ends our completion (and is not returned)
        out = out[: out.index(0)]
    result = lm.text_completion(["Hello world"], max_new_tokens=8, temperature=0.0)[0]
    assert result["tokens"] == out and result["generation"] == lm.tokenizer.decode(out)
