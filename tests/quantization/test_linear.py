"""Quantized Linear layers: the quantizers' error bounds, and every kernel path against the matmul with the
dequantized weight."""

import functools

import pytest
import torch
import torch.nn.functional as F
from kernel_marks import KERNELS as OUR_KERNELS
from torch import nn

from modelcode.kernels.cpu import unpack_int8
from modelcode.quantization import (
    Int4Linear,
    Int8Linear,
    PackedInt4Linear,
    PackedInt8Linear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)
from modelcode.quantization.linear import pack_nibbles, unpack_nibbles

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def linear(in_features, out_features, bias=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        m.weight.normal_(0, 0.05)
        m.weight[0].zero_()  # a row of zeros must not divide by zero
        m.weight[1, 5] = 1.0  # an outlier
        if bias:
            m.bias.normal_(0, 0.1)
    return m.to(dtype)


# ------------------------------------------------------------------------------------------ quantizers

def test_int8_codes_and_error_bound():
    w = linear(96, 40).weight
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (40,)
    assert q.abs().max() == 127  # each row's largest weight uses the whole range
    err = (dequantize_int8(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()  # round to nearest: within half a step
    assert (dequantize_int8(q, scales)[0] == 0).all()


def test_nibbles_round_trip_and_byte_order():
    q = torch.randint(0, 16, (8, 64), dtype=torch.int32)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 32)
    assert packed[0, 0] == q[0, 0] * 16 + q[0, 1]  # even column in the high nibble
    assert torch.equal(unpack_nibbles(packed), q)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_codes_and_error_bound(group_size):
    w = linear(256, 48).weight
    packed, scales, zeros = quantize_int4(w, group_size)
    assert packed.shape == (48, 128) and scales.shape == zeros.shape == (48, 256 // group_size)
    w_hat = dequantize_int4(packed, scales, zeros)
    step = scales.repeat_interleave(group_size, dim=1)
    assert ((w_hat - w).abs() <= step / 2 + 1e-6).all()
    groups = w.view(48, -1, group_size)  # both ends of each group's range are codes: min -> 0, max -> 15
    torch.testing.assert_close(w_hat.view(48, -1, group_size).amin(-1), groups.amin(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(w_hat.view(48, -1, group_size).amax(-1), groups.amax(-1), atol=1e-6, rtol=0)


def test_smaller_groups_are_more_accurate():
    w = linear(512, 64).weight
    errors = [(dequantize_int4(*quantize_int4(w, g)) - w).pow(2).mean() for g in (32, 64, 128, 256)]
    assert errors == sorted(errors)


# ---------------------------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(1, 1), (2, 8), (3, 7)])  # rows: 1 and 16 take the CPU kernel in bf16, 21 not
@pytest.mark.parametrize("bias", [False, True])
def test_int8_matches_dequantized_matmul(dtype, tol, shape, bias):
    lin = linear(160, 72, bias, dtype)
    q8 = Int8Linear.from_linear(lin)
    x = torch.randn(*shape, 160).to(dtype)  # (B, T, in): the layer flattens and restores the leading dims
    ref = F.linear(x.float(), dequantize_int8(q8.weight, q8.scales.float()), None if lin.bias is None
                   else lin.bias.float())
    y = q8(x)
    assert y.shape == (*shape, 72) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_int8_cpu_kernel_itself():
    """The bf16 kernel against a float32 reference: int8 weight [N, K], scales per row applied to the output."""
    q8 = Int8Linear.from_linear(linear(160, 72, dtype=torch.bfloat16))
    x = torch.randn(4, 160).to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(x, q8.weight, q8.scales)
    ref = x.float() @ dequantize_int8(q8.weight, q8.scales.float()).T
    torch.testing.assert_close(y.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(q8(x), y)  # and the layer takes it for 4 rows


def assert_kernel_and_dense_paths_match(layer, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """A bfloat16 layer against float64 with its dequantized weight: 1, 3 and 16 rows (decoding) run in the
    kernel, where the products are exact and the sums float32 or wider, so only bfloat16's rounding of y is
    left; 17 rows (prefill) in a dense matmul, which also rounds the dequantized weight to bfloat16."""
    out_features, in_features = weight.shape
    for rows in (1, 3, 16, 17):
        x = torch.randn(rows, in_features).bfloat16()
        ref = F.linear(x.double(), weight.double(), bias.double())
        y = layer(x)
        assert y.shape == (rows, out_features) and y.dtype == torch.bfloat16
        tol = 8e-3 if rows <= 16 else 2e-2
        torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=0)


@OUR_KERNELS
def test_our_int8_cpu_kernel_matches_the_float_matmul():
    """modelcode's int8 kernel (in_features a multiple of 128): the activations as integers (22-bit with
    AVX-512, 14-bit per 32 inputs with AVX2), the products summed exactly in integers."""
    q8 = Int8Linear.from_linear(linear(384, 128, bias=True, dtype=torch.bfloat16))
    packed = q8.pack()
    assert isinstance(packed, PackedInt8Linear) and torch.equal(unpack_int8(packed.weight), q8.weight)
    assert_kernel_and_dense_paths_match(packed, dequantize_int8(q8.weight, q8.scales), q8.bias)
    x = torch.randn(3, 384).bfloat16()
    assert torch.equal(packed(x), torch.ops.modelcode.int8_mm(x, packed.weight, packed.scales) + q8.bias)
    # each row's outputs do not depend on the others: the same row by row or together, near PyTorch's kernel's
    assert torch.equal(packed(x[1:2]), packed(x)[1:2])
    torch.testing.assert_close(packed(x), q8(x), atol=1e-2 * q8(x).abs().max().item(), rtol=0)


@OUR_KERNELS
def test_int8_layers_the_kernel_does_not_take_stay_portable():
    q8 = Int8Linear.from_linear(linear(384, 72, dtype=torch.bfloat16))  # 72 outputs: not a multiple of 64
    assert q8.pack() is q8
    fits = Int8Linear.from_linear(linear(384, 128, dtype=torch.bfloat16))
    assert isinstance(fits.pack(), PackedInt8Linear)
    assert fits.to(torch.float32).pack() is fits  # float32 scales: the kernel is for bfloat16


@OUR_KERNELS
def test_our_int8_kernel_keeps_small_activations_beside_a_huge_one():
    """Activations become integers scaled to their largest: next to an outlier 2^16 times the rest (as LLMs'
    massive activations are), the others still count to bfloat16's precision, at least those outside its group of
    32 (the AVX2 kernel scales each 32 inputs on their own; here the outlier's neighbours are zero)."""
    from modelcode.kernels.cpu import int8_mm

    q8 = Int8Linear.from_linear(linear(256, 64, dtype=torch.bfloat16))
    q8.weight[:32, 7] = 0  # outputs 0..31 do not see the outlier: they are sums of the small inputs alone
    w = dequantize_int8(q8.weight, q8.scales).double()
    packed = q8.pack()
    x = torch.randn(2, 256).bfloat16()
    x[0, :32], x[0, 7] = 0, 2.0**16
    x[1].zero_()  # and a row of zeros gives zeros
    ref, y = x.double() @ w.T, int8_mm(x, packed.weight, packed.scales).double()
    for part in (slice(0, 32), slice(32, 64)):
        torch.testing.assert_close(y[0, part], ref[0, part], atol=8e-3 * ref[0, part].abs().max().item(), rtol=0)
    assert torch.equal(y[1], torch.zeros(64, dtype=torch.float64))
    x[0, 3] = float("nan")
    assert int8_mm(x, packed.weight, packed.scales)[0].isnan().all()  # NaN in, NaN out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_cpu_kernel_matches_dequantized_matmul(dtype, tol, group_size):
    portable = Int4Linear.from_linear(linear(256, 48, bias=True, dtype=dtype), group_size)
    packed = portable.pack()
    assert isinstance(packed, PackedInt4Linear) and packed.kernel == "cpu"
    x = torch.randn(2, 5, 256).to(dtype)
    ref = F.linear(x.float(), dequantize_int4(portable.weight, portable.scales.float(), portable.zeros.float()),
                   portable.bias.float())
    y = packed(x)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    # and the portable layer's own forward (the fallback path) is that same reference
    torch.testing.assert_close(portable(x).float(), ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_int4_kernel_layout_round_trips():
    from modelcode.kernels.cpu import pack_int4, unpack_int4

    codes = torch.randint(0, 16, (192, 256), dtype=torch.uint8)
    scales, zeros = torch.rand(2, 192, 8).bfloat16()
    w, sz = pack_int4(codes, scales, zeros)
    assert w.shape == (3, 32, 4, 64) and sz.shape == (3, 8, 2, 64)
    back = unpack_int4(w, sz)
    assert torch.equal(back[0], codes) and torch.equal(back[1], scales) and torch.equal(back[2], zeros)
    # output i's code of input 8c + 4e + 2h + p: nibble h of byte e of 16-bit word 2i + p of a 64-byte run
    i, c, e, h, p = 3, 5, 1, 1, 0
    byte = w[1, c, 2, 4 * i + 2 * p + e]
    assert (byte >> 4 if h else byte & 0xF) == codes[64 + 32 + i, 8 * c + 4 * e + 2 * h + p]


@OUR_KERNELS
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_our_int4_cpu_kernel_matches_dequantized_matmul(group_size):
    portable = Int4Linear.from_linear(linear(512, 192, bias=True, dtype=torch.bfloat16), group_size)
    packed = portable.pack()
    assert isinstance(packed, PackedInt4Linear) and packed.kernel == "modelcode-cpu"
    weight = dequantize_int4(portable.weight, portable.scales.float(), portable.zeros.float())
    assert_kernel_and_dense_paths_match(packed, weight, portable.bias)
    # 4 rows at a time, then one by one (7 = 4 + 3): each row's outputs are the bits it gets alone
    x = torch.randn(7, 512).bfloat16()
    together = packed(x)
    assert all(torch.equal(together[i:i + 1], packed(x[i:i + 1])) for i in range(7))


@OUR_KERNELS
@pytest.mark.parametrize("mode", ["int8", "int4-32", "int4-128"])
def test_our_prompt_path_is_the_bf16_kernel_on_the_dequantized_weight(mode):
    """More rows than the int8 and int4 kernels take (a prompt): the weight dequantized to bfloat16, with AVX-512 64
    outputs at a time, multiplied as `bf16_mm` multiplies (AMX where the CPU has it): the same bits as `bf16_mm` on
    the whole dequantized weight; with AVX2, PyTorch's matmul on it."""
    from modelcode.kernels.cpu import (
        bf16_mm,
        dequantize_packed,
        int4_prefill_mm,
        int8_prefill_mm,
        loaded_build,
        pack_bf16,
        pack_int4,
        pack_int8,
    )

    torch.manual_seed(0)
    n, k = 192, 512
    if mode == "int8":
        codes, scales = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n).bfloat16() / 64
        w = pack_int8(codes)
        dense = dequantize_int8(codes, scales)
        prefill = functools.partial(int8_prefill_mm, w=w, scales=scales)
    else:
        group_size = int(mode.split("-")[1])
        scales, zeros = torch.rand(2, n, k // group_size).bfloat16() / 64
        w, sz = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8), scales, zeros)
        dense = dequantize_packed(w, sz, group_size)
        prefill = functools.partial(int4_prefill_mm, w=w, sz=sz, group_size=group_size)
    x = torch.randn(40, k).bfloat16()
    ref = x.double() @ dense.double().T
    for rows in (1, 4, 5, 17, 40):  # the vector kernel's rows, AMX's (where the CPU has it), AMX's tiles cut short
        y = prefill(x[:rows])
        if loaded_build().label == "AVX-512":
            assert torch.equal(y, bf16_mm(x[:rows], pack_bf16(dense))), rows
        torch.testing.assert_close(y.double(), ref[:rows], atol=8e-3 * ref.abs().max().item(), rtol=0)


@OUR_KERNELS
def test_our_int4_kernel_keeps_small_activations_beside_a_huge_one():
    """As for int8: inputs beside an outlier 2^16 times larger still count to bfloat16's precision, at least
    those outside its group of 32 (the AVX2 kernel scales each 32 inputs on their own; here the outlier's
    neighbours are zero)."""
    portable = Int4Linear.from_linear(linear(256, 64, dtype=torch.bfloat16), 32)
    codes = unpack_nibbles(portable.weight)
    codes[:32, 7], portable.zeros[:32, 0] = 8, 0  # outputs 0..31 weigh input 7 by (8 - 8) * s + 0: they do not see it
    portable.weight.copy_(pack_nibbles(codes))
    w = dequantize_int4(portable.weight, portable.scales.double(), portable.zeros.double())
    packed = portable.pack()
    x = torch.randn(1, 256).bfloat16()
    x[0, :32], x[0, 7] = 0, 2.0**16
    ref, y = x.double() @ w.T, packed(x).double()
    for part in (slice(0, 32), slice(32, 64)):
        torch.testing.assert_close(y[0, part], ref[0, part], atol=8e-3 * ref[0, part].abs().max().item(), rtol=0)


def test_int4_falls_back_visibly_when_no_kernel_takes_the_shape():
    portable = Int4Linear.from_linear(linear(64, 24), 32)  # the CPU kernel needs out_features % 16 == 0
    with pytest.warns(UserWarning, match="dequantize-then-matmul.*out_features divisible by 16 \\(got 24\\)"):
        layer = portable.pack()
    assert layer is portable
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ dequantize_int4(portable.weight, portable.scales, portable.zeros).T)


@CUDA
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_cuda_kernel_matches_dequantized_matmul(group_size):
    portable = Int4Linear.from_linear(linear(384, 64, bias=True, dtype=torch.bfloat16), group_size).cuda()
    packed = portable.pack()
    assert isinstance(packed, PackedInt4Linear) and packed.kernel in ("triton", "cuda")  # triton where it imports
    x = torch.randn(3, 384, dtype=torch.bfloat16, device="cuda")
    ref = F.linear(x.float(), dequantize_int4(portable.weight, portable.scales.float(), portable.zeros.float()),
                   portable.bias.float())
    torch.testing.assert_close(packed(x).float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


@CUDA
def test_int8_cuda_path_matches_dequantized_matmul():
    q8 = Int8Linear.from_linear(linear(128, 64, dtype=torch.bfloat16)).cuda()
    x = torch.randn(3, 128, dtype=torch.bfloat16, device="cuda")
    ref = x.float() @ dequantize_int8(q8.weight, q8.scales.float()).T
    torch.testing.assert_close(q8(x).float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("group_size", [16, 48, 512])
def test_unsupported_group_size(group_size):
    with pytest.raises(ValueError, match=f"group_size {group_size} is not supported: use one of 32, 64, 128, 256"):
        Int4Linear(256, 32, group_size=group_size)


def test_group_size_that_does_not_divide_the_inputs():
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features=96: use group_size 32"):
        quantize_int4(torch.randn(32, 96), 64)
    with pytest.raises(ValueError, match="in_features=80: no supported group size .* divides it; leave this layer "
                                         "unquantized or use int8"):
        Int4Linear(80, 32, group_size=32)
