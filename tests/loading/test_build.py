"""The one model builder: a folder or a preset -> the model on the meta device, used by load, show and bench."""

import pytest
import torch

from modelcode.api import EMBEDDED
from modelcode.loading import build, load_model
from modelcode.structure import empty_model


def test_a_folder_builds_on_meta_in_its_own_dtype_or_the_one_asked():
    built = build(EMBEDDED["tinystories-656k"])
    assert all(p.device.type == "meta" for p in built.model.parameters())
    assert built.dtype == torch.float32 and not built.quantized
    assert {p.dtype for p in build(EMBEDDED["tinystories-656k"], dtype="bfloat16").model.parameters()} == {
        torch.bfloat16}


def test_load_show_and_bench_build_the_same_module_tree():
    loaded = load_model(EMBEDDED["tinystories-656k"])[0]
    shown = empty_model("tinystories-656k")
    assert [(n, p.shape, p.dtype) for n, p in loaded.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in shown.named_parameters()]
    preset = build(preset="llama-1b", dtype="bfloat16").model  # what bench fills with random weights
    assert preset.config.n_layers == 22 and {p.device.type for p in preset.parameters()} == {"meta"}


def test_neither_folder_nor_preset_says_what_to_give():
    with pytest.raises(ValueError, match="checkpoint folder or a preset"):
        build()
