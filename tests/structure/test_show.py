"""`modelcode show` and `modelcode.structure`: the tree and the diagram of every architecture in the registry,
built from tiny random Hugging Face checkpoints; the pictures reflect the model (parallel vs sequential
residual, pre- vs post-norm, block counts, cross-attention, sliding window, q/k/v biases); the KV-cache
size equals what a real cache stores."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from cli_helpers import cli_error
from PIL import Image

from modelcode.api import EMBEDDED
from modelcode.cli.__main__ import main as cli
from modelcode.layers import ContiguousKVCache
from modelcode.loading import load_model, registry
from modelcode.models.llama import Llama, LlamaConfig
from modelcode.structure import describe, diagram, empty_model
from modelcode.structure.layout import Layout

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=128, max_position_embeddings=64)
# model_type -> (transformers config class, model class, config fields); the layer count is passed apart.
BUILDERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=2, sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(SMALL, use_parallel_residual=True)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(SMALL, max_position_embeddings=32)),
    "vit": ("ViTConfig", "ViTForImageClassification", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                            image_size=32, patch_size=8, num_labels=5)),
    "marian": ("MarianConfig", "MarianMTModel", dict(vocab_size=60, d_model=64, encoder_attention_heads=4,
                                                     decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
                                                     max_position_embeddings=32, pad_token_id=59,
                                                     decoder_start_token_id=59, eos_token_id=0)),
}
LAYER_FIELDS = {"marian": ("encoder_layers", "decoder_layers")}


def hf_folder(folder: Path, model_type: str, n_layers: int = 2, **overrides) -> Path:
    """A tiny random transformers checkpoint saved with save_pretrained."""
    config_class, model_class, fields = BUILDERS[model_type]
    layers = dict.fromkeys(LAYER_FIELDS.get(model_type, ("num_hidden_layers",)), n_layers)
    config = getattr(transformers, config_class)(**{**fields, **layers, **overrides})
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    return folder


def total_in(text: str) -> int:
    return int(re.search(r"total: ([\d,]+) parameters", text).group(1).replace(",", ""))


def by_name(d, name: str):
    found = [n for n in d.nodes.values() if n.name == name]
    assert found, f"no node named {name!r} in {[n.name for n in d.nodes.values()]}"
    return found[0]


def preds(d, node, primary: bool | None = True):
    return [d.nodes[e.src] for e in d.edges if e.dst == node.id and (primary is None or e.primary == primary)]


@pytest.mark.parametrize("model_type", sorted(set(BUILDERS) | set(registry.ARCHITECTURES)))
def test_show_writes_tree_svg_and_png_for_every_architecture(model_type, tmp_path, capsys):
    assert model_type in BUILDERS, f"add a tiny {model_type} checkpoint to BUILDERS so that `show` is tested on it"
    folder = hf_folder(tmp_path / f"tiny-{model_type}", model_type)
    cli(["show", str(folder), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    model, _, _ = load_model(folder)  # the real model, weights and all
    assert total_in(printed) == sum(p.numel() for p in model.parameters())
    svg, png = tmp_path / "out" / f"tiny-{model_type}.svg", tmp_path / "out" / f"tiny-{model_type}.png"
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text() and svg.stat().st_size > 10_000
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert 600 < im.width < 8000 and 1200 < im.height < 16000, im.size
        drawn = (np.asarray(im.convert("L")) < 200).mean()
    assert 0.02 < drawn < 0.5, f"{drawn:.1%} of the picture is drawn"


def test_show_with_no_arguments_shows_the_embedded_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli(["show"])
    printed = capsys.readouterr().out
    model, _, _ = load_model(EMBEDDED["tinystories-656k"])
    assert total_in(printed) == sum(p.numel() for p in model.parameters())
    assert "layers.0-1: TransformerBlock ×2" in printed and "bytes per token" in printed
    assert (tmp_path / "tinystories-656k.svg").stat().st_size > 0 and (tmp_path / "tinystories-656k.png").stat().st_size


def test_svg_and_png_flags_write_just_those_files_and_depth_cuts_the_tree(tmp_path, capsys):
    folder = hf_folder(tmp_path / "m", "llama")
    cli(["show", str(folder), "--svg", str(tmp_path / "a.svg"), "--depth", "1"])
    printed = capsys.readouterr().out
    assert (tmp_path / "a.svg").exists() and not list(tmp_path.glob("*.png"))
    assert "layers.0-1: TransformerBlock ×2" in printed and "attention_norm" not in printed


@pytest.mark.parametrize("argv, message", [
    (["show", "no/such/folder"], "checkpoint folder not found: no/such/folder"),
    (["show", "--out", "x", "--svg", "y.svg"], "use either --out DIR"),
    (["show", "--depth", "-1"], "--depth must be 0 or more"),
    (["show", "--preset", "llama-9"], "unknown preset 'llama-9'; presets: llama-1b"),
])
def test_bad_input_says_what_to_do(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert message in cli_error(argv, capsys)


def test_unregistered_model_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="not in the architecture registry.*pass `task=`"):
        describe(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("bfloat16", 2)])
def test_kv_cache_bytes_equal_what_a_real_cache_stores(dtype, size, tmp_path):
    folder = hf_folder(tmp_path / "m", "llama", n_layers=3)
    model, config, _ = load_model(folder, dtype=dtype)
    cache = ContiguousKVCache(config.n_layers)
    model(torch.arange(5)[None], cache=cache)
    stored = sum(t.nbytes for t in cache.k + cache.v) // 5
    kv = describe(empty_model(folder, dtype=dtype)).kv_cache
    assert kv.bytes_per_token == stored == 2 * 3 * 2 * (64 // 4) * size
    assert "bytes per token" in str(kv) and describe(empty_model(tmp_path / "m"), task="causal-lm").kv_cache


def test_a_preset_alone_shows_a_real_size_model_with_its_published_numbers():
    tree = describe(empty_model(preset="llama-3.2-1b", dtype="bfloat16"))
    assert tree.total_params == 1_235_814_400  # Llama 3.2 1B, as Meta's model card counts it (tied output)
    assert tree.kv_cache.bytes_per_token == 32 * 1024  # 16 layers x 8 kv heads x 64 x 2 (k, v) x 2 bytes
    assert "layers.0-15: TransformerBlock ×16" in str(tree) and "(1, 8, 128256)" in str(tree)


def test_meta_and_real_models_give_the_same_tree(tmp_path):
    for model_type in ("gpt_neox", "marian"):
        folder = hf_folder(tmp_path / model_type, model_type)
        real, _, _ = load_model(folder)
        assert str(describe(real)) == str(describe(empty_model(folder)))


def test_block_count_follows_n_layers(tmp_path):
    for model_type, n, block in (("llama", 3, "TransformerBlock"), ("gpt_neox", 5, "Layer")):
        model = empty_model(hf_folder(tmp_path / model_type, model_type, n_layers=n))
        frames = [node for node in diagram(model).nodes.values() if node.kind == "frame"]
        assert [(f.name, f.repeat) for f in frames] == [(f"layers.0-{n - 1}", n)]
        assert f"layers.0-{n - 1}: {block} ×{n}" in str(describe(model))


def test_blocks_that_differ_are_not_folded_together():
    with torch.device("meta"):  # Mistral-style: the first two layers use a sliding window, the last two do not
        model = Llama(LlamaConfig(vocab_size=32, dim=64, n_layers=4, n_heads=4, hidden_dim=96, sliding_window=4,
                                  sliding_layers=(True, True, False, False)))
    text = str(describe(model))
    assert "layers.0-1: TransformerBlock ×2" in text and "layers.2-3: TransformerBlock ×2" in text
    frames = [node for node in diagram(model).nodes.values() if node.kind == "frame"]
    assert [(f.name, f.repeat) for f in frames] == [("layers.0-1", 2), ("layers.2-3", 2)]


def test_parallel_residual_draws_attention_and_mlp_side_by_side(tmp_path):
    shapes = {}
    for parallel in (True, False):
        d = diagram(empty_model(hf_folder(tmp_path / str(parallel), "gpt_neox", use_parallel_residual=parallel)))
        mlp_norm = by_name(d, "post_attention_layernorm")
        # Parallel: the MLP's norm reads the block input; sequential: it reads the sum after attention.
        assert [p.kind for p in preds(d, mlp_norm)] == (["port"] if parallel else ["op"])
        lay = Layout(d)
        attn, mlp = lay.rect[by_name(d, "attention").id], lay.rect[by_name(d, "mlp").id]
        shapes[parallel] = (attn.cy == mlp.cy, attn.cx == mlp.cx)
    assert shapes[True] == (True, False)  # same row, two columns
    assert shapes[False] == (False, True)  # one column, the MLP below


def test_pre_norm_and_post_norm_blocks_differ(tmp_path):
    llama = diagram(empty_model(hf_folder(tmp_path / "llama", "llama")))
    bert = diagram(empty_model(hf_folder(tmp_path / "bert", "bert")))
    # Pre-norm (Llama): attention reads a norm, the block ends on a residual sum.
    assert [p.category for p in preds(llama, by_name(llama, "attention"))] == ["norm"]
    # Post-norm (BERT): attention reads the block input, each residual sum goes into a norm, which ends the block.
    assert [p.kind for p in preds(bert, by_name(bert, "attention"))] == ["port"]
    sums = [n for n in bert.nodes.values() if n.kind == "op" and n.title == "+"]
    assert len(sums) == 2 and all(
        [bert.nodes[e.dst].category for e in bert.edges if e.src == s.id] == ["norm"] for s in sums)
    for d in (llama, bert):
        frame = next(n for n in d.nodes.values() if n.kind == "frame")
        last = preds(d, d.nodes[frame.graph.out_port])[0]
        assert (last.category if d is bert else last.title) == ("norm" if d is bert else "+")


def test_encoder_decoder_links_the_encoder_output_to_cross_attention(tmp_path):
    d = diagram(empty_model(hf_folder(tmp_path / "marian", "marian")))
    encoder, decoder = by_name(d, "encoder"), by_name(d, "decoder")
    cross = by_name(d, "encoder_attn")
    assert [(d.nodes[e.src].name, e.label) for e in d.edges if e.dst == cross.id and not e.primary] == [
        ("encoder", "memory")]
    lay = Layout(d)
    enc, dec = lay.rect[encoder.id], lay.rect[decoder.id]
    assert enc.y == dec.y and enc.right < dec.x  # two columns, side by side


def test_sliding_window_and_qkv_bias_show_in_tree_and_diagram(tmp_path):
    seen = {}
    for model_type in ("llama", "mistral", "qwen2"):
        model = empty_model(hf_folder(tmp_path / model_type, model_type))
        attention = by_name(diagram(model), "attention")
        seen[model_type] = (str(describe(model)), attention.detail)
    tree, detail = seen["mistral"]
    assert "sliding_window=4" in tree and "sliding_window=4" in detail
    tree, detail = seen["qwen2"]
    assert "wq: Linear 64→64, bias" in tree and "bias: wq, wk, wv" in detail and "wo: Linear 64→64 " in tree + " "
    tree, detail = seen["llama"]
    assert "sliding_window" not in tree + detail and "bias" not in tree + detail


class _ToyBlock(torch.nn.Module):
    """GPT-2's block written with torch's own layers: no model of ours, no name the diagram could know."""

    def __init__(self, d: int):
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d),
                                       torch.nn.Dropout(0.1))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _ToyGPT(torch.nn.Module):
    def __init__(self, n_layers: int = 3, d: int = 32):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": 100})()
        self.wte, self.wpe, self.drop = torch.nn.Embedding(100, d), torch.nn.Embedding(64, d), torch.nn.Dropout(0.1)
        self.h = torch.nn.ModuleList(_ToyBlock(d) for _ in range(n_layers))
        self.ln_f, self.lm_head = torch.nn.LayerNorm(d), torch.nn.Linear(d, 100, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def test_a_model_outside_the_zoo_gets_its_diagram_from_its_code():
    model = _ToyGPT().eval()
    d = diagram(model, task="causal-lm")
    frame = next(n for n in d.nodes.values() if n.kind == "frame")
    assert (frame.name, frame.repeat) == ("h.0-2", 3)
    inside = [n for n in frame.graph.nodes if n.kind != "port"]
    assert [n.title for n in inside] == ["LayerNorm", "MultiheadAttention", "+", "LayerNorm", "Sequential", "+"]
    assert [n.category for n in inside] == ["norm", "attention", "op", "norm", "mlp", "op"]
    assert not any(n.title == "Dropout" for n in d.nodes.values())  # does nothing at inference: no box
    assert "tied: weight = wte.weight" in by_name(d, "lm_head").detail
    tree = describe(model, task="causal-lm")
    assert tree.total_params == sum(p.numel() for p in model.parameters()) and tree.kv_cache is None
