"""Kernels modelcode brings where PyTorch's own are slower, installed on a built model from outside by one
call per device, `install_cpu_kernels(model)` or `install_gpu_kernels(model)`, which compiled decoding makes:

- `cpu.py`, `cpu.cpp`, `attention.cpp`: matmuls for decoding (bfloat16: for prompts and batches too) and
  decoding's attention, on x86 CPUs with AVX-512 (BF16, VNNI), the matmuls also with AVX2;
- `linear.py`: `PackedBF16Linear`, the layer that runs the bfloat16 one (the int8 and int4 layers that run
  the others are quantization's);
- `attention.py`: `CPUDecodeAttention`, swapped in for the model's attention core;
- `fuse.py`: layers that read the same input made one matmul (on GPU too);
- `pages.py`: weights moved onto huge pages;
- `triton_gemv.py`: int8 and int4 matmuls for decoding on GPU, which the quantized layers call themselves.
"""

from dataclasses import dataclass

from torch import nn

from modelcode.kernels.attention import swap_decode_attention
from modelcode.kernels.cpu import attention_kernel_available, kernels_available
from modelcode.kernels.fuse import fuse_projections
from modelcode.kernels.linear import PackedBF16Linear, pack_bf16_linears
from modelcode.kernels.pages import move_to_huge_pages


@dataclass(frozen=True)
class Installed:
    """What `install_cpu_kernels` changed."""

    packed_layers: int = 0  # bfloat16 Linear layers swapped for PackedBF16Linear
    attention_layers: int = 0  # attention cores swapped for CPUDecodeAttention
    fused_groups: int = 0  # groups of layers reading the same input made one matmul
    huge_page_bytes: int = 0  # bytes of weights moved onto huge pages


def install_cpu_kernels(model: nn.Module) -> Installed:
    """Install modelcode's CPU kernels on a built model, in place: where the kernels run here (AVX-512 or
    AVX2, the kernels built), bfloat16 Linear layers packed for the matmul kernel, the attention cores
    swapped for the decode-attention kernel (AVX-512) and layers that read the same input fused (packed int8 and int4
    layers too); on any CPU, the weights moved onto huge pages. The outputs stay those of the model's own
    computation, up to the order of float additions. For inference only: weights are rearranged in place."""
    if next(model.parameters()).device.type != "cpu":
        return Installed()
    if not kernels_available():
        return Installed(huge_page_bytes=move_to_huge_pages(model))
    attention = swap_decode_attention(model) if attention_kernel_available() else 0
    return Installed(pack_bf16_linears(model), attention, fuse_projections(model), move_to_huge_pages(model))


def install_gpu_kernels(model: nn.Module) -> Installed:
    """On CUDA, in place: layers that read the same input fused into one matmul, plain Linear layers as well
    as the quantized ones on triton's layout (`kernels/fuse.py`); elsewhere nothing. The outputs stay those of
    the model's own computation, up to the order of float additions."""
    if next(model.parameters()).device.type != "cuda":
        return Installed()
    return Installed(fused_groups=fuse_projections(model, linear=True))


__all__ = ["Installed", "PackedBF16Linear", "install_cpu_kernels", "install_gpu_kernels", "kernels_available",
           "pack_bf16_linears"]
