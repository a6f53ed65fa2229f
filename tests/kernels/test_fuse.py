"""Fusing the layers that read the same input (q, k, v; gate, up) into one matmul: same outputs, same state
dict, one copy of the weights."""

import pytest
import torch

import modelcode
from modelcode.api import EMBEDDED
from modelcode.kernels import kernels_available, pack_bf16_linears
from modelcode.kernels.fuse import fuse_projections
from modelcode.layers import project
from modelcode.quantization import quantize, save_quantized

KERNELS = pytest.mark.skipif(not kernels_available(), reason="modelcode's CPU kernels need AVX512-BF16 and VNNI")


def prepared(mode: str):
    lm = modelcode.load("tinystories-656k", dtype="bfloat16")
    if mode == "bf16":
        pack_bf16_linears(lm.model)
    else:
        quantize(lm.model, mode, 32)
    tokens = torch.tensor([lm.tokenizer.encode("Once upon a time, there was a fox.", bos=True)])
    return lm.model, tokens


@KERNELS
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_fused_projections_keep_outputs_state_dict_and_one_copy_of_the_weights(mode):
    model, tokens = prepared(mode)
    tokens = torch.cat([tokens, tokens], dim=1)  # 24 rows: past the int8 and int4 kernels' (16), run densely
    lengths = (1, 3, 12, tokens.shape[1])  # decoding rows in the kernels (bf16's takes any number)
    with torch.no_grad():
        before = {n: model(tokens[:, :n]) for n in lengths}
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert fuse_projections(model) == 4  # 2 layers x (q, k, v and gate, up)
        attention, ffn = model.layers[1].attention, model.layers[1].feed_forward
        fusion = attention.wq.fusion
        assert fusion.members == (attention.wq, attention.wk, attention.wv) and attention.wv.fusion is fusion
        assert ffn.w1.fusion.members == (ffn.w1, ffn.w3) and not hasattr(ffn.w2, "fusion")
        for layer in fusion.members:  # slices of the fused matrix, not copies
            assert layer.weight.untyped_storage().data_ptr() == fusion.fused.weight.untyped_storage().data_ptr()
        after = model.state_dict()
        assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
        # exactly as before: in the kernels each output is its own dot product, and past their rows the
        # layers run one by one
        for n in lengths:
            assert torch.equal(model(tokens[:, :n]), before[n]), n


@KERNELS
def test_project_runs_layers_one_by_one_unless_given_exactly_a_fused_group():
    model, _ = prepared("int8")
    fuse_projections(model)
    attention = model.layers[0].attention
    x = torch.randn(1, 3, 128).bfloat16()
    with torch.no_grad():
        alone = {name: getattr(attention, name)(x) for name in ("wq", "wk", "wv")}
        for names in (("wq", "wk", "wv"), ("wk", "wq", "wv"), ("wq", "wk")):
            outputs = project(x, *(getattr(attention, name) for name in names))
            assert len(outputs) == len(names)
            for name, y in zip(names, outputs):
                assert torch.equal(y, alone[name]), (names, name)


def test_layers_without_a_fusable_kernel_are_left_alone():
    model = modelcode.load("tinystories-656k").model  # float32 nn.Linear layers: PyTorch's matmul
    assert fuse_projections(model) == 0
    assert not hasattr(model.layers[0].attention.wq, "fusion")


@KERNELS
def test_a_fused_int8_model_is_packed_and_says_how_to_save(tmp_path):
    model, _ = prepared("int8")  # fused layers are packed ones, whose layout is not written to disk
    assert fuse_projections(model) == 4
    with pytest.raises(ValueError, match="packed for one device.*quantize with pack=False, save, then pack"):
        save_quantized(model, EMBEDDED["tinystories-656k"], tmp_path / "q")
