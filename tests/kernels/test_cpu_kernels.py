"""modelcode's CPU decoding kernels: layouts that round-trip, and each kernel against the plain matmul."""

import pytest
import torch
import torch.nn.functional as F
from kernel_marks import KERNELS
from torch import nn

import modelcode
from modelcode.kernels import PackedBF16Linear, pack_bf16_linears
from modelcode.kernels.cpu import pack_bf16, unpack_lanes


def test_bf16_layout_round_trips():
    w = torch.randn(192, 96).bfloat16()
    packed = pack_bf16(w)
    assert packed.shape == (3, 48, 4, 16, 2)
    assert torch.equal(unpack_lanes(packed), w)
    # for each pair of inputs and block of 16 outputs: output i's values of inputs 2c and 2c + 1
    assert torch.equal(packed[2, 7, 1, 5], w[128 + 16 + 5, 14:16])


@KERNELS
@pytest.mark.parametrize("shape", [(192, 512), (64, 128)])
def test_packed_bf16_linear_matches_the_matmul(shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=True).bfloat16()
    packed = PackedBF16Linear(linear)
    for rows in (1, 3, 16, 70):  # every row count runs in the kernel, 4 rows at a time
        x = torch.randn(2, rows, shape[1]).bfloat16()
        ref = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        y = packed(x)
        assert y.shape == (2, rows, shape[0]) and y.dtype == torch.bfloat16
        # products exact, sums in float32: bfloat16's rounding of y (and, for the bias, of y + b) is left
        torch.testing.assert_close(y.float(), ref, atol=8e-3 * ref.abs().max().item(), rtol=0)


@KERNELS
def test_bf16_kernel_gives_each_row_the_same_output_whatever_else_is_in_the_batch():
    """On the vector unit (1-4 rows) and on AMX (5 or more, where the CPU has it), a row's output does not depend
    on the rows beside it."""
    torch.manual_seed(0)
    k = 4096 + 512  # 18 of the kernel's runs of 256 inputs, the last cut short: sums carry over between runs
    weight = torch.randn(128, k).bfloat16()
    w = pack_bf16(weight)
    x = torch.randn(133, k).bfloat16()  # more rows than one tile of the kernel's (128)
    together = torch.ops.modelcode.bf16_mm(x, w)
    ref = x.float() @ weight.float().T  # right, not only consistent: every run's sums carried into the next
    torch.testing.assert_close(together.float(), ref, atol=8e-3 * ref.abs().max().item(), rtol=0)
    alone = torch.cat([torch.ops.modelcode.bf16_mm(x[m:m + 1], w) for m in range(len(x))])
    for rows in (2, 3, 4):  # groups of every size the vector kernel takes: each row as alone
        assert torch.equal(torch.ops.modelcode.bf16_mm(x[:rows], w), alone[:rows]), rows
    for rows in (5, 9, 17, 128):  # AMX's rows (where the CPU has it) also, each as in any other batch of 5 or more
        assert torch.equal(torch.ops.modelcode.bf16_mm(x[:rows], w), together[:rows]), rows
    if torch.ops.modelcode.amx_ready():  # the two units round a few float32 sums differently: one bfloat16 step
        torch.testing.assert_close(together.float(), alone.float(), atol=1e-5 * ref.abs().max().item(), rtol=2**-7)
    else:
        assert torch.equal(together, alone)


@KERNELS
def test_packing_a_model_keeps_its_outputs_and_one_copy_of_its_weights():
    lm = modelcode.load("tinystories-656k", dtype="bfloat16")
    tokens = torch.tensor([lm.tokenizer.encode("Once upon a time, there was a fox.", bos=True)])
    with torch.no_grad():
        before = lm.model(tokens).float()
        n_before = sum(t.numel() for t in [*lm.model.parameters(), *lm.model.buffers()])
        assert pack_bf16_linears(lm.model) == 14  # every Linear but the head, which is tied to the embeddings
        assert type(lm.model.output) is nn.Linear and isinstance(lm.model.layers[0].attention.wq, PackedBF16Linear)
        assert sum(t.numel() for t in [*lm.model.parameters(), *lm.model.buffers()]) == n_before
        for n in (1, tokens.shape[1]):  # one row, and the whole prompt
            torch.testing.assert_close(lm.model(tokens[:, :n]).float(), before[:, :n], atol=0.05, rtol=0.05)


@KERNELS  # where the kernels cannot run nothing is packed anyway: the test would say nothing
def test_float32_layers_are_left_alone():
    model = modelcode.load("tinystories-656k").model
    assert pack_bf16_linears(model) == 0
    assert not any(isinstance(m, PackedBF16Linear) for m in model.modules())
