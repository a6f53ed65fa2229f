"""Kernels modelcode brings where PyTorch's own are slower: matmuls for decoding (bfloat16: for prompts and
batches too) and decoding's attention on CPUs with AVX512-BF16 and VNNI (`cpu.py`, `cpu.cpp`,
`attention.cpp`), `PackedBF16Linear`, the layer that runs
the bfloat16 one, `fuse.py`, which makes layers that read the same input one matmul, and `pages.py`, which
moves weights onto huge pages."""

from modelcode.kernels.cpu import kernels_available
from modelcode.kernels.linear import PackedBF16Linear, pack_bf16_linears

__all__ = ["PackedBF16Linear", "kernels_available", "pack_bf16_linears"]
