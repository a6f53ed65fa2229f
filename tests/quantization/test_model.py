"""Quantizing whole models: which layers are swapped, the quality bars on the embedded TinyStories-656K,
and quantized folders that `modelcode.load` opens with no flag."""

import json

import pytest
import torch
from hf_reference import tiny_hf_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import modelcode
from modelcode.api import EMBEDDED
from modelcode.errors import CheckpointError
from modelcode.quantization import (
    Int4Linear,
    Int8Linear,
    PackedInt4Linear,
    Scheme,
    pack_layers,
    quantize,
    save_quantized,
    scheme_of,
)
from modelcode.quantization.quality import perplexity, read_texts
from modelcode.quantization.quantize import head_mode

SOURCE = EMBEDDED["tinystories-656k"]
SCHEMES = [("int8", None), ("int4", 32)]


@pytest.fixture(scope="module")
def stories():
    tok = modelcode.load("tinystories-656k").tokenizer
    return [tok.encode(t, bos=True, eos=True) for t in read_texts()]


@pytest.fixture(scope="module")
def reference_perplexity(stories):
    return perplexity(modelcode.load("tinystories-656k").model, stories)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each scheme's quantized folder of the embedded model, and the in-memory quantized model."""
    out = {}
    for mode, group_size in SCHEMES:
        lm = modelcode.load("tinystories-656k")
        quantize(lm.model, mode, group_size, pack=False)
        folder = save_quantized(lm.model, SOURCE, tmp_path_factory.mktemp(mode) / "q")
        out[mode] = folder, pack_layers(lm.model)
    return out


def test_every_linear_but_the_output_head_is_swapped():
    model = quantize(modelcode.load("tinystories-656k").model, "int4", 32)
    kinds = {name: type(m) for name, m in model.named_modules() if "Linear" in type(m).__name__}
    assert kinds.pop("output") is nn.Linear
    assert len(kinds) == 14 and set(kinds.values()) == {PackedInt4Linear}
    assert model.output.weight is model.tok_embeddings.weight  # still tied, still float
    assert isinstance(model.tok_embeddings, nn.Embedding)


def test_head_is_quantized_when_asked_unless_tied(tmp_path):
    tied = quantize(modelcode.load("tinystories-656k").model, "int4", 32, head=True)
    assert type(tied.output) is nn.Linear and tied.output.weight is tied.tok_embeddings.weight
    tiny_hf_model("untied-embeddings").save_pretrained(tmp_path / "hf")
    untied = quantize(modelcode.load(tmp_path / "hf").model, "int8", head=True, pack=False)
    assert isinstance(untied.output, Int8Linear)
    save_quantized(untied, tmp_path / "hf", tmp_path / "q")
    assert isinstance(modelcode.load(tmp_path / "q").model.output, Int8Linear)  # and it loads back so
    # the defaults: the head in int8, for int4 layers too; head=True: the layers' mode; head=False: kept
    assert isinstance(quantize(modelcode.load(tmp_path / "hf").model, "int8", pack=False).output, Int8Linear)
    assert isinstance(quantize(modelcode.load(tmp_path / "hf").model, "int4", 32).output, Int8Linear)
    assert isinstance(quantize(modelcode.load(tmp_path / "hf").model, "int4", 32, head=True).output, PackedInt4Linear)
    assert type(quantize(modelcode.load(tmp_path / "hf").model, "int8", head=False).output) is nn.Linear
    assert type(quantize(modelcode.load(tmp_path / "hf").model, "int4", 32, head=False).output) is nn.Linear


def test_int4_layers_with_an_int8_head_round_trip(tmp_path):
    tiny_hf_model("untied-embeddings").save_pretrained(tmp_path / "hf")
    model = quantize(modelcode.load(tmp_path / "hf").model, "int4", 32, pack=False)
    assert scheme_of(model) == Scheme("int4", 32, head="int8") and head_mode(model) == "int8"
    save_quantized(model, tmp_path / "hf", tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()["modelcode.quantization"])
        head, layer = f.get_tensor("output.weight"), f.get_tensor("layers.0.feed_forward.w1.weight")
        assert "output.zeros" not in set(f.keys())
    assert meta == {"mode": "int4", "group_size": 32, "head": "int8"}
    assert head.dtype == torch.int8 and layer.dtype == torch.uint8
    loaded = modelcode.load(tmp_path / "q").model
    assert isinstance(loaded.output, Int8Linear) and isinstance(loaded.layers[0].feed_forward.w1, PackedInt4Linear)
    tokens = torch.tensor([[1, 17, 42, 99, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(tokens), pack_layers(model)(tokens))


def test_head_of_its_own_mode_is_int8_under_int4_only():
    with pytest.raises(ValueError, match="head='int8': the only head of its own mode is 'int8', under int4"):
        Scheme("int8", head="int8")
    with pytest.raises(ValueError, match="head='int4'"):
        Scheme("int4", 32, head="int4")


@pytest.mark.parametrize("mode,group_size,bar", [("int8", None, 0.01), ("int4", 32, 0.05)])
def test_perplexity_on_heldout_stories(stories, reference_perplexity, mode, group_size, bar):
    model = quantize(modelcode.load("tinystories-656k").model, mode, group_size)
    ppl = perplexity(model, stories)
    print(f"{mode} g{group_size}: perplexity {reference_perplexity:.3f} -> {ppl:.3f} "
          f"({ppl / reference_perplexity - 1:+.2%})")
    assert ppl != reference_perplexity  # the layers really changed
    assert abs(ppl / reference_perplexity - 1) < bar


def test_int8_head_costs_int4_nothing_measurable(stories, reference_perplexity):
    """The embedded model's head is tied (it stays): an untied copy of it shows what the default does to a head."""
    def untied_int4(head):
        model = modelcode.load("tinystories-656k").model
        model.output.weight = nn.Parameter(model.output.weight.detach().clone(), requires_grad=False)
        return quantize(model, "int4", 32, head=head)

    int8_head, float_head = untied_int4(None), untied_int4(False)
    assert isinstance(int8_head.output, Int8Linear) and type(float_head.output) is nn.Linear
    ppl, float_ppl = perplexity(int8_head, stories), perplexity(float_head, stories)
    print(f"int4 g32, untied head: int8 {ppl:.3f}, float {float_ppl:.3f} (reference {reference_perplexity:.3f})")
    assert ppl != float_ppl and abs(ppl / float_ppl - 1) < 0.002
    assert abs(ppl / reference_perplexity - 1) < 0.05


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_folder_loads_with_no_flag_and_same_logits(saved, mode):
    folder, in_memory = saved[mode]
    lm = modelcode.load(folder)
    expected = Int8Linear if mode == "int8" else PackedInt4Linear
    assert sum(isinstance(m, expected) for m in lm.model.modules()) == 14
    tokens = torch.tensor([lm.tokenizer.encode("Once upon a time, a little fox found a key.", bos=True)])
    with torch.no_grad():
        assert torch.equal(lm.model(tokens), in_memory(tokens))
    assert lm.tokenizer is not None and lm.config.vocab_size == 2048


@pytest.mark.parametrize("mode,group_size", SCHEMES)
def test_folder_records_the_scheme_and_copies_every_other_file(saved, mode, group_size):
    folder, _ = saved[mode]
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()["modelcode.quantization"])
        weight = f.get_tensor("layers.0.attention.wq.weight")
        names = set(f.keys())
    assert meta == {"mode": mode, "group_size": group_size, "head": None}  # tied: the head stays
    assert weight.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert "layers.0.attention.wq.scales" in names and "output.weight" not in names  # tied: stored once
    assert ("layers.1.feed_forward.w2.zeros" in names) == (mode == "int4")
    source_files = {p.name for p in SOURCE.iterdir() if p.is_file()}
    assert {p.name for p in folder.iterdir()} == source_files  # model.safetensors replaced, the rest copied
    assert (folder / "config.json").read_bytes() == (SOURCE / "config.json").read_bytes()


def test_load_quantized_folder_in_bfloat16(saved):
    folder, _ = saved["int4"]
    lm = modelcode.load(folder, dtype="bfloat16")
    layer = lm.model.layers[0].attention.wq
    assert isinstance(layer, PackedInt4Linear) and layer.scales_and_zeros.dtype == torch.bfloat16
    with torch.no_grad():
        logits = lm.model(torch.tensor([[1, 80, 147, 201, 282, 57]]))
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()


def test_quantized_checkpoint_with_biases_round_trips(tmp_path):
    """Qwen2's q, k, v carry biases; the folder is an HF one with no tokenizer."""
    tiny_hf_model("qwen2-qkv-bias").save_pretrained(tmp_path / "hf")
    lm = modelcode.load(tmp_path / "hf")
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.no_grad():
        original = lm.model(tokens)
        quantize(lm.model, "int8", pack=False)
        assert lm.model.layers[0].attention.wq.bias is not None
        in_memory = lm.model(tokens)
    save_quantized(lm.model, tmp_path / "hf", tmp_path / "q")
    with torch.no_grad():
        loaded = modelcode.load(tmp_path / "q").model(tokens)
    assert torch.equal(loaded, in_memory)
    torch.testing.assert_close(loaded, original, atol=0.05 * original.abs().max().item(), rtol=0)


def test_layers_no_kernel_takes_fall_back_visibly(tmp_path):
    """wk and wv of this model have 8 outputs: the CPU int4 kernel needs a multiple of 16."""
    from modelcode.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=96, dim=64, n_layers=1, n_heads=8, n_kv_heads=1, hidden_dim=128))
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    quantize(model, "int4", 32, pack=False)
    with torch.no_grad():
        portable = model(tokens)
    with pytest.warns(UserWarning, match="out_features divisible by 16 \\(got 8\\)"):
        pack_layers(model)
    assert isinstance(model.layers[0].attention.wk, Int4Linear)
    assert isinstance(model.layers[0].attention.wq, PackedInt4Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), portable, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- bad input

def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown quantization mode 'int3': use one of int8, int4"):
        quantize(modelcode.load("tinystories-656k").model, "int3")


def test_packed_model_cannot_be_saved(tmp_path):
    model = quantize(modelcode.load("tinystories-656k").model, "int4", 32)
    with pytest.raises(ValueError, match="packed for one device.*quantize with pack=False, save, then pack"):
        save_quantized(model, SOURCE, tmp_path / "q")


def test_unquantized_model_cannot_be_saved_as_quantized(tmp_path):
    with pytest.raises(ValueError, match="found 0: quantize it first"):
        save_quantized(modelcode.load("tinystories-656k").model, SOURCE, tmp_path / "q")


def test_output_folder_must_differ_from_the_source(saved):
    folder, _ = saved["int8"]
    lm = modelcode.load("tinystories-656k")
    quantize(lm.model, "int8", pack=False)
    with pytest.raises(ValueError, match="is the source folder"):
        save_quantized(lm.model, folder, folder)


def test_output_folder_must_be_new_or_empty(saved):
    folder, _ = saved["int8"]
    lm = modelcode.load("tinystories-656k")
    quantize(lm.model, "int8", pack=False)
    with pytest.raises(ValueError, match="output folder .* is not empty: choose a new folder"):
        save_quantized(lm.model, SOURCE, folder)


def relabelled(folder, out, scheme: dict):
    """A copy of a quantized folder's config and tensors whose metadata claims another scheme."""
    out.mkdir()
    (out / "config.json").write_bytes((folder / "config.json").read_bytes())
    tensors = load_file(folder / "model.safetensors")
    save_file(tensors, out / "model.safetensors", metadata={"modelcode.quantization": json.dumps(scheme)})
    return out


def test_corrupt_scheme_in_metadata(saved, tmp_path):
    bad = relabelled(saved["int8"][0], tmp_path / "bad", {"mode": "int3"})
    with pytest.raises(ValueError, match="unreadable quantization scheme.*unknown quantization mode 'int3'"):
        modelcode.load(bad)


def test_scheme_that_does_not_fit_the_tensors(saved, tmp_path):
    """int8 tensors labelled int4: the strict loader names the first tensor that does not fit."""
    bad = relabelled(saved["int8"][0], tmp_path / "bad", {"mode": "int4", "group_size": 32})
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.0\.attention\.wk\.scales' in model\.safetensors has "
                                              r"shape \(64,\), but .* expects \(64, 4\)"):
        modelcode.load(bad)


def test_int8_scheme_takes_no_group_size():
    with pytest.raises(ValueError, match="group_size applies to int4 only"):
        Scheme("int8", 32)
