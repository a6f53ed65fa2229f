"""A quantized model never decodes slower than bfloat16: where this machine's timing says the quantized kernel
loses, those layers run in bfloat16 (here with the timing faked)."""

import pytest
import torch

import modelcode
from modelcode.quantization import Int8Linear, PackedInt8Linear, host, quantize
from modelcode.quantization.host import QUANTIZED, Timing, unquantize_where_slower


@pytest.fixture
def timings(monkeypatch, tmp_path):
    """Fake measurements, by mode, kept in a fresh file; `calls` counts the measurements made."""
    fake = {"int8": Timing(2.0, 1.0), "int4": Timing(0.5, 1.0)}  # int8 loses, int4 wins
    calls = []
    monkeypatch.setattr(host, "measure", lambda mode: calls.append(mode) or fake[mode])
    monkeypatch.setattr(host, "timings_file", lambda: tmp_path / "speed.json")
    monkeypatch.delenv("MODELCODE_KEEP_QUANTIZED", raising=False)
    return fake, calls


def quantized_model(mode: str):
    lm = modelcode.load("tinystories-656k", dtype="bfloat16")
    quantize(lm.model, mode, 32)
    tokens = torch.tensor([lm.tokenizer.encode("Once upon a time, there was a fox.", bos=True)])
    return lm.model, tokens


def n_quantized(model) -> int:
    return sum(isinstance(m, QUANTIZED) for m in model.modules())


def test_layers_whose_kernel_loses_run_in_bfloat16_with_the_same_outputs(timings, capsys):
    model, tokens = quantized_model("int8")
    assert n_quantized(model) > 0
    with torch.no_grad():
        before = model(tokens)
        dequantized = unquantize_where_slower(model)
        after = model(tokens)
    assert n_quantized(model) == 0 and dequantized > 0
    # the same weights (the dequantized values), so the same outputs up to the order of float additions
    torch.testing.assert_close(after.float(), before.float(), atol=3e-2 * before.abs().max().item(), rtol=0)
    err = capsys.readouterr().err
    assert "the int8 kernel decodes slower than bfloat16" in err and "MODELCODE_KEEP_QUANTIZED=1" in err


def test_layers_whose_kernel_wins_stay_quantized(timings):
    model, _ = quantized_model("int4")
    quantized = n_quantized(model)
    assert unquantize_where_slower(model) == 0 and n_quantized(model) == quantized
    # int4's head is int8 by default: the int8 kernel loses here, so the head alone runs in bfloat16
    assert not any(isinstance(m, Int8Linear | PackedInt8Linear) for m in model.modules())


def test_each_mode_is_measured_once_per_machine(timings):
    _, calls = timings
    for _ in range(2):
        unquantize_where_slower(quantized_model("int8")[0])
    assert calls == ["int8"]
    assert host.timing("int8") == Timing(2.0, 1.0) and calls == ["int8"]  # read back from the file


def test_the_user_can_keep_the_quantized_layers(timings, monkeypatch):
    _, calls = timings
    monkeypatch.setenv("MODELCODE_KEEP_QUANTIZED", "1")
    model, _ = quantized_model("int8")
    quantized = n_quantized(model)
    assert unquantize_where_slower(model) == 0 and n_quantized(model) == quantized
    assert calls == []


def test_dequantized_layers_compute_what_the_quantized_ones_did():
    model, _ = quantized_model("int4")
    for layer in [m for m in model.modules() if isinstance(m, QUANTIZED)]:
        x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
        dense = host.dequantized(layer)
        assert dense.weight.dtype == torch.bfloat16
        ref = layer(x)
        torch.testing.assert_close(dense(x), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def test_the_measurement_times_both_kernels():
    t = host.measure("int4", stack_bytes=8 << 20)
    assert t.quantized_s > 0 and t.bf16_s > 0

