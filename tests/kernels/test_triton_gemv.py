"""The Triton GEMV kernels (kernels/triton_gemv.py) against the plain computation: dequantize, then a float32
matmul; and the layers that run them.

On a GPU they run compiled, on CUDA tensors. Without one they run on CPU tensors under Triton's interpreter, which
needs TRITON_INTERPRET=1 set before triton is first imported, and in a test session something else (torch.compile,
dynamo) may import it before this file is read: so unless the variable came with the process, the checks run in a
fresh pytest process that has it (`test_in_a_fresh_process_under_the_interpreter`). The variable is not set here
for the rest of the session: on a GPU it would turn torch.compile's own Triton kernels over to the interpreter too.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton): the Triton kernels "
                                              "are not checked")

from modelcode.kernels import triton_gemv  # noqa: E402
from modelcode.kernels.triton_gemv import int4_gemv, int8_gemv, interpreted  # noqa: E402
from modelcode.quantization.linear import (  # noqa: E402
    Int4Linear,
    Int8Linear,
    PackedInt4Linear,
    dequantize_int4,
    dequantize_int8,
    dequantized_weight,
    quantize_int4,
    quantize_int8,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_HERE = DEVICE == "cuda" or interpreted()
HERE = pytest.mark.skipif(not RUNS_HERE, reason="triton was imported without TRITON_INTERPRET=1: checked in "
                                                "test_in_a_fresh_process_under_the_interpreter's process")
CUDA = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
GROUP_SIZES = (32, 64, 128, 256)


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """y equals the float32 reference up to the order of float32 sums, and for a 16-bit output one rounding: a
    GPU rounds to nearest (half an ulp), the interpreter truncates (less than one ulp, `eps` of the value)."""
    assert y.dtype == dtype and y.shape == ref.shape
    rtol = 1e-4 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=1e-5 * ref.abs().max().item())


def int8_case(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0] = 0  # a row of zeros
    q, scales = quantize_int8(w.to(dtype))
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = x.float() @ dequantize_int8(q, scales.float()).T
    return x.to(DEVICE), q.to(DEVICE), scales.to(DEVICE), ref.to(DEVICE)


def int4_case(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05 + 0.01  # an offset: the zeros matter
    packed, scales, zeros = quantize_int4(w.to(dtype), group_size)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = x.float() @ dequantize_int4(packed, scales.float(), zeros.float()).T
    return x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), ref.to(DEVICE)


# --------------------------------------------------------------------------------------------- kernels

@HERE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_int8_gemv_matches_dequantized_matmul(m, dtype):
    x, q, scales, ref = int8_case(m, 40, 600, dtype)  # 40 outputs: blocks of 16 and a partial one; K: a tail
    assert_matches(int8_gemv(x, q, scales), ref, dtype)


@HERE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_gemv_matches_dequantized_matmul(group_size, m, dtype):
    # 10 groups: 32 and 64 take 8 and 4 to a loop step where they fit, 2 here
    x, packed, scales, zeros, ref = int4_case(m, 40, 10 * group_size, group_size, dtype)
    assert_matches(int4_gemv(x, packed, scales, zeros, group_size), ref, dtype)


@HERE
@pytest.mark.parametrize("block_n", [32, 64])
def test_wider_blocks_and_more_rows_than_a_tile(block_n):
    x, q, scales, ref = int8_case(17, 100, 512, torch.bfloat16)  # 17 rows: two row tiles
    assert_matches(int8_gemv(x, q, scales, block_n=block_n), ref, torch.bfloat16)
    x, packed, scales, zeros, ref = int4_case(17, 100, 512, 64, torch.bfloat16)
    assert_matches(int4_gemv(x, packed, scales, zeros, 64, block_n=block_n), ref, torch.bfloat16)


@HERE
def test_zero_rows_give_zeros_and_scales_may_be_strided():
    x, packed, scales, zeros, ref = int4_case(2, 24, 256, 32, torch.float32)
    x[1], ref[1] = 0, 0
    side_by_side = torch.stack([scales, zeros], dim=-1)  # as PackedInt4Linear keeps them
    y = int4_gemv(x, packed, *side_by_side.unbind(-1), 32)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert_matches(y, ref, torch.float32)


def test_bad_inputs_are_named():
    x, packed, scales, zeros, _ = int4_case(1, 16, 128, 32, torch.float32)
    with pytest.raises(ValueError, match="group_size 48 must be a power of two"):
        int4_gemv(x, packed, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"scales of shape \(16, 2\), expected \(16, 4\)"):
        int4_gemv(x, packed, scales[:, :2], zeros, 32)
    with pytest.raises(ValueError, match=r"activations of shape \(1, 64\), expected \(rows, 128\)"):
        int4_gemv(x[:, :64], packed, scales, zeros, 32)
    with pytest.raises(ValueError, match="weight codes must be a 2-D torch.int8 tensor"):
        int8_gemv(x[:, :64], packed, scales[:, 0])


def test_without_triton_the_launchers_say_so(monkeypatch):
    monkeypatch.setattr(triton_gemv, "triton", None)
    monkeypatch.setattr(triton_gemv, "_IMPORT_ERROR", "triton does not import (ImportError: no triton)")
    assert not triton_gemv.triton_available()
    x, q, scales, _ = int8_case(1, 16, 64, torch.float32)
    with pytest.raises(RuntimeError, match="int8_gemv needs triton: triton does not import"):
        int8_gemv(x, q, scales)


@pytest.mark.skipif(RUNS_HERE, reason="the kernels run in this process")
def test_cpu_tensors_without_the_interpreter_say_how_to_get_it():
    x, q, scales, _ = int8_case(1, 16, 64, torch.float32)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before triton is first imported"):
        int8_gemv(x, q, scales)


# ---------------------------------------------------------------------------------------------- layers

@HERE
@pytest.mark.parametrize("group_size", [32, 128])
def test_packed_int4_layer_of_the_triton_kind(group_size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48, bias=True).to(torch.bfloat16)
    portable = Int4Linear.from_linear(linear, group_size).to(DEVICE)
    packed = PackedInt4Linear(portable, "triton")
    weight = dequantize_int4(portable.weight, portable.scales.float(), portable.zeros.float())
    assert torch.equal(dequantized_weight(packed), dequantize_int4(portable.weight, portable.scales, portable.zeros))
    for rows in (3, 20):  # the kernel, then the dense matmul past 16 rows
        x = torch.randn(1, rows, 256, device=DEVICE).bfloat16()
        ref = x.float() @ weight.T + portable.bias.float()
        # bfloat16 roundings: of the output, of the bias added to it, of the weight dequantized for the dense path
        torch.testing.assert_close(packed(x).float(), ref, rtol=0, atol=1e-2 * ref.abs().max().item())


@CUDA
def test_cuda_layers_pick_the_triton_kernels():
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 96).to(torch.bfloat16)
    assert Int4Linear.from_linear(linear, 64).cuda().pack().kernel == "triton"
    q8 = Int8Linear.from_linear(linear).cuda()
    x = torch.randn(5, 512, device="cuda").bfloat16()
    assert_matches(q8(x), x.float() @ dequantize_int8(q8.weight, q8.scales.float()).T, torch.bfloat16)


# ------------------------------------------------------------------------------------- the interpreter

@pytest.mark.skipif(RUNS_HERE, reason="the kernels run in this process")
def test_in_a_fresh_process_under_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1 is set, yet triton was imported without it")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", __file__], cwd=root,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and re.search(r"\b\d+ passed", out), out[-6000:]
