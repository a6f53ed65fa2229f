"""`modelcode check`: our model beside transformers on the same folder passes on every architecture's tiny
random model and on TinyStories-656K, and fails, with a table that says where, on a broken weight map."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from cli_helpers import cli_error
from hf_reference import BASE, tiny_hf_model
from marian_reference import marian_folder

from modelcode.cli.__main__ import main as cli
from modelcode.loading.weight_maps import llama as llama_maps

MISTRAL_TOKENIZER = Path(__file__).parents[1] / "assets" / "tokenizers" / "mistral-tokenizer"


def drawn(model):
    """Every weight drawn (biases and norms too), so that no mapping mistake hides."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    return model


def neox(folder):
    drawn(transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        rotary_pct=0.25, max_position_embeddings=64, bos_token_id=None, eos_token_id=None))).save_pretrained(folder)


def bert(folder):
    drawn(transformers.BertModel(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=24))).save_pretrained(folder)


def vit(folder):
    drawn(transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=3))).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def mistral_with_chat_template(folder):
    """A tiny random Mistral under a real tokenizer with a chat template (ChatML, no BOS wanted)."""
    config = transformers.MistralConfig(**{**BASE, "vocab_size": 32002, "tie_word_embeddings": True,
                                           "bos_token_id": 1, "eos_token_id": 32000})
    drawn(transformers.MistralForCausalLM(config)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(MISTRAL_TOKENIZER / name, folder / name)


BUILDERS = {
    **{variant: lambda folder, v=variant: tiny_hf_model(v).save_pretrained(folder)
       for variant in ("llama3.1-rope-scaling", "mistral-sliding-window", "qwen2-qkv-bias", "tied-embeddings")},
    "gpt_neox": neox, "bert": bert, "vit": vit, "marian": marian_folder, "mistral-chat": mistral_with_chat_template,
}


def check(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        cli(["check", *argv])
        sys.exit(0)
    return e.value.code, capsys.readouterr().out


def test_tinystories_passes(capsys):
    code, out = check([], capsys)
    assert code == 0 and out.strip().endswith("verdict: all checks hold"), out
    for row in ("logits, max |ours - transformers|  ok", "greedy, 16 new tokens", "batched = unbatched",
                "tokenizer ids and text", "chat prompt, one BOS", "stop ids"):
        assert row in out


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_architecture_passes(name, tmp_path, capsys):
    BUILDERS[name](tmp_path)
    code, out = check([str(tmp_path), "--new-tokens", "6"], capsys)
    assert code == 0 and "FAIL" not in out, out
    if name == "mistral-chat":
        assert "prompt equals transformers' template" in out
        assert any(line.split()[:5] == ["tokenizer", "ids", "and", "text", "ok"] and "5/5 texts" in line
                   for line in out.splitlines())


def test_a_broken_weight_map_fails_with_the_table(tmp_path, capsys, monkeypatch):
    tiny_hf_model("llama2-mha").save_pretrained(tmp_path)
    broken = dict(llama_maps.HF)  # q and k swapped: same shapes, so loading alone cannot notice
    broken["model.layers.{}.self_attn.q_proj.weight"] = "layers.{}.attention.wk.weight"
    broken["model.layers.{}.self_attn.k_proj.weight"] = "layers.{}.attention.wq.weight"
    monkeypatch.setattr(llama_maps, "HF", broken)
    from modelcode.loading import registry

    monkeypatch.setitem(registry.ARCHITECTURES, "llama", registry.Architecture(
        registry.ARCHITECTURES["llama"].config_from_hf, registry.ARCHITECTURES["llama"].model, broken))
    code, out = check([str(tmp_path), "--new-tokens", "6"], capsys)
    assert code == 1, out
    assert "logits, max |ours - transformers|  FAIL" in out and out.strip().splitlines()[-1].startswith(
        "verdict: FAIL (logits, max |ours - transformers|")


def test_without_transformers_says_so(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    cli_error(["check"], capsys, "modelcode check: error: modelcode check compares with transformers, which is not "
              "installed here: pip install transformers")
