"""Fusing the layers that read the same input (q, k, v; gate, up) into one matmul: same outputs, same state
dict, one copy of the weights."""

import pytest
import torch
from kernel_marks import KERNELS

import modelcode
from modelcode.api import EMBEDDED
from modelcode.kernels import Installed, install_gpu_kernels, pack_bf16_linears
from modelcode.kernels.fuse import FusedSameInput, fuse_projections
from modelcode.layers import SameInput
from modelcode.quantization import quantize, save_quantized


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
        assert isinstance(attention.qkv, FusedSameInput) and attention.qkv.names == ("wq", "wk", "wv")
        assert isinstance(ffn.gate_up, FusedSameInput) and ffn.gate_up.names == ("w1", "w3")
        for layer in (attention.wq, attention.wk, attention.wv):  # slices of the fused matrix, not copies
            assert layer.weight.untyped_storage().data_ptr() == attention.qkv.fused.weight.untyped_storage().data_ptr()
        after = model.state_dict()
        assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
        # exactly as before: in the kernels each output is its own dot product, and past their rows the
        # layers run one by one
        for n in lengths:
            assert torch.equal(model(tokens[:, :n]), before[n]), n


@KERNELS
def test_a_fused_group_equals_its_layers_run_one_by_one():
    model, _ = prepared("int8")
    fuse_projections(model)
    attention = model.layers[0].attention
    with torch.no_grad():
        for rows in (3, 24):  # in the kernel, and past its rows (the layers one by one)
            x = torch.randn(1, rows, 128).bfloat16()
            outputs = attention.qkv(attention, x)
            assert len(outputs) == 3
            for name, y in zip(("wq", "wk", "wv"), outputs):
                assert torch.equal(y, getattr(attention, name)(x)), (rows, name)


def test_layers_without_a_fusable_kernel_are_left_alone():
    model = modelcode.load("tinystories-656k").model  # float32 nn.Linear layers: PyTorch's matmul
    assert fuse_projections(model) == 0
    assert type(model.layers[0].attention.qkv) is SameInput


def test_plain_linear_layers_fuse_where_asked():
    # What `install_gpu_kernels` does on CUDA (where one GEMV beats three), here on CPU.
    lm = modelcode.load("tinystories-656k")  # float32 nn.Linear layers
    model = lm.model
    tokens = torch.tensor([lm.tokenizer.encode("Once upon a time, there was a fox.", bos=True)])
    with torch.no_grad():
        before, state = model(tokens), {k: v.clone() for k, v in model.state_dict().items()}
        assert install_gpu_kernels(model) == Installed()  # not on CUDA: nothing
        assert fuse_projections(model, linear=True) == 4
        attention = model.layers[0].attention
        assert isinstance(attention.qkv, FusedSameInput) and type(attention.qkv.fused) is torch.nn.Linear
        storage = attention.qkv.fused.weight.untyped_storage().data_ptr()
        assert attention.wk.weight.untyped_storage().data_ptr() == storage  # a slice of it, not a copy
        after = model.state_dict()
        assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
        torch.testing.assert_close(model(tokens), before, atol=1e-5, rtol=0)  # up to the order of additions


@KERNELS
def test_a_fused_int8_model_is_packed_and_says_how_to_save(tmp_path):
    model, _ = prepared("int8")  # fused layers are packed ones, whose layout is not written to disk
    assert fuse_projections(model) == 4
    with pytest.raises(ValueError, match="packed for one device.*quantize with pack=False, save, then pack"):
        save_quantized(model, EMBEDDED["tinystories-656k"], tmp_path / "q")
