"""Weight-only quantized Linear layers: the weight is stored in 8 or 4 bits, activations stay in floating
point, and each matmul dequantizes on the fly (inside PyTorch's packed kernels where they exist).

int8: one scale per output row, symmetric:  W[n, k] ~= q[n, k] * scale[n],  q in [-128, 127].
int4: one scale and zero per group of `group_size` inputs of a row, asymmetric (the "tinygemm" convention
of PyTorch's int4 kernels and gpt-fast):  W[n, k] ~= (q[n, k] - 8) * scale[n, g] + zero[n, g],  q in [0, 15],
g = k // group_size; `zero` is the value that code 8 stands for.

Each layer exists in a portable form, which is what a checkpoint stores and what works on any device:
`Int8Linear` (int8 rows + scales) and `Int4Linear` (two 4-bit codes per byte + scales and zeros). The fast
kernels want the weight rearranged, in a layout of their device (PyTorch's int4 layouts differ between CPU and
CUDA and are internal to PyTorch), so `pack()` returns a `PackedInt8Linear` or `PackedInt4Linear` for the
device the weights are on; those layouts are never written to disk.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from modelcode.kernels.cpu import (
    OUTPUTS_PER_BLOCK,
    dequantize_packed,
    int4_mm,
    int4_prefill_mm,
    int8_fits,
    int8_mm,
    int8_prefill_mm,
    kernels_available,
    pack_int4,
    pack_int8,
    unpack_int8,
)

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4 kernels (CPU and CUDA) accept
INT8_KERNEL_MAX_ROWS = 16  # above this many rows, dequantize-then-matmul beats the CPU int8 kernel (GPU: one tile)
INT4_KERNEL_MAX_ROWS = 16  # likewise for modelcode's int4 CPU kernel
GPU_KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # activations the Triton kernels take on GPU at full speed


def triton_gemv():
    """kernels/triton_gemv.py, imported where a GPU first asks for it: importing triton takes a second."""
    from modelcode.kernels import triton_gemv

    return triton_gemv


def triton_ready() -> bool:
    return triton_gemv().triton_available()


def _smallest_scale(dtype: torch.dtype) -> float:
    # A row or group of zeros would get scale 0 and divide by zero; any tiny positive scale codes it exactly.
    return torch.finfo(dtype).smallest_normal


# ---------------------------------------------------------------------------------------------- int8

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 codes (out, in) and per-row scales (out,) in the weight's dtype."""
    w32 = w.detach().float()
    scales = (w32.abs().amax(dim=1) / 127).clamp(min=_smallest_scale(w.dtype)).to(w.dtype)
    # Code with the scale as stored (rounded to the weight's dtype), so that q * scale is as close as it can be.
    q = (w32 / scales.float()[:, None]).round().clamp(-128, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.to(scales.dtype) * scales[:, None]


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows and one scale per row.

    This is the portable form (what a checkpoint stores, and what runs on GPU): for a few rows of bfloat16
    activations on CPU its matmul is PyTorch's `_weight_int8pack_mm`, which reads the int8 weight directly; on
    GPU with triton, a few rows of 16-bit activations run modelcode's kernel (kernels/triton_gemv.py), likewise;
    everything else takes `linear(x, W.to(x.dtype)) * scale`. Call `pack()` for modelcode's faster CPU kernel
    where it runs.
    """

    kernel_max_rows = INT8_KERNEL_MAX_ROWS

    @property
    def outputs_stack(self) -> bool:
        """Whether it fuses with layers that read the same input (kernels/fuse.py): on CUDA, where triton's kernel
        reads this layout; on CPU its packed form (`pack`) is the one that fuses."""
        return self.weight.is_cuda

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        # Parameters (frozen) rather than buffers, so the strict loader checks and fills them like any weight.
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scales = quantize_int8(linear.weight)
        with torch.device("meta"):  # shapes only: the tensors come next
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)
        return _filled(module, weight=q, scales=scales, bias=linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.is_cpu and x.dtype == torch.bfloat16 and rows <= self.kernel_max_rows:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features).contiguous(), self.weight,
                                                   self.scales).view(*x.shape[:-1], self.out_features)
        elif x.is_cuda and x.dtype in GPU_KERNEL_DTYPES and rows <= self.kernel_max_rows and triton_ready():
            y = triton_gemv().int8_gemv(x.reshape(rows, self.in_features), self.weight, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def pack(self) -> nn.Module:
        """A `PackedInt8Linear` where modelcode's int8 kernel runs (an x86 CPU with AVX-512 or AVX2, bfloat16
        scales, in_features a multiple of 128, out_features of 64), else this layer itself."""
        fits = (self.weight.device.type == "cpu" and self.scales.dtype == torch.bfloat16
                and int8_fits(self.in_features, self.out_features) and kernels_available())
        return PackedInt8Linear(self) if fits else self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedInt8Linear(nn.Module):
    """`Int8Linear` with its weight rearranged for modelcode's CPU kernel (kernels/cpu.cpp: `vpdpbusd` with 16
    outputs in the lanes of each instruction), for up to `INT8_KERNEL_MAX_ROWS` rows of bfloat16 activations;
    past that (prefill) the weight is dequantized to bfloat16 for a dense matmul (in C++: with AVX-512 64 outputs at
    a time, in cache), as are activations of other dtypes. It streams the codes about twice as fast as PyTorch's
    `_weight_int8pack_mm`, which converts each code to float (see BENCHMARKS.md)."""

    kernel_max_rows = INT8_KERNEL_MAX_ROWS
    outputs_stack = True  # its tensors stack along the outputs into one layer of this kind (kernels/fuse.py)

    def __init__(self, layer: Int8Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("weight", pack_int8(layer.weight.detach()))
        self.register_buffer("scales", layer.scales.detach())
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.dtype == torch.bfloat16:
            mm = int8_mm if rows <= self.kernel_max_rows else int8_prefill_mm
            y = mm(x.reshape(rows, self.in_features), self.weight, self.scales).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, unpack_int8(self.weight).to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------- int4

def check_int4_shape(in_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size {group_size} is not supported: use one of "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))} (the sizes PyTorch's int4 kernels take)")
    if in_features % group_size:
        fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        raise ValueError(f"int4 group_size {group_size} does not divide in_features={in_features}: "
                         + (f"use group_size {' or '.join(map(str, fits))}" if fits else
                            f"no supported group size ({', '.join(map(str, INT4_GROUP_SIZES))}) divides it; "
                            "leave this layer unquantized or use int8"))


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes in [0, 15] -> (out, in/2) uint8, even column in the high nibble (the byte order
    PyTorch's CUDA packer reads)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (out, in/2) uint8 -> (out, in) codes as int32."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).view(packed.shape[0], -1).to(torch.int32)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> packed codes (out, in/2) uint8, scales and zeros (out, in/group_size)."""
    out_features, in_features = w.shape
    check_int4_shape(in_features, group_size)
    groups = w.detach().float().reshape(out_features, in_features // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    # Spread each group's [min, max] over the 16 codes; code 8 stands for `zero`, so code 0 is the min.
    scales = ((hi - lo) / 15).clamp(min=_smallest_scale(w.dtype)).to(w.dtype)
    zeros = (lo + 8 * scales.float()).to(w.dtype)
    code0 = zeros.float() - 8 * scales.float()  # the min again, from the stored (rounded) scale and zero
    q = ((groups - code0[..., None]) / scales.float()[..., None]).round().clamp(0, 15)
    return pack_nibbles(q.reshape(out_features, in_features)), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(packed)  # (out, in)
    out_features, n_groups = scales.shape
    groups = (q.view(out_features, n_groups, -1) - 8).to(scales.dtype)
    return (groups * scales[..., None] + zeros[..., None]).view(out_features, -1)


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as 4-bit codes, a scale and a zero per group of `group_size` inputs.

    This is the portable form (what a checkpoint stores); its forward dequantizes the whole weight and
    multiplies, which is slow but runs anywhere and is the reference the packed kernels are tested against.
    Call `pack()` to get the fast module for the device the weights are on.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 dtype: torch.dtype | None = None):
        super().__init__()
        check_int4_shape(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        dtype = dtype or torch.get_default_dtype()
        n_groups = in_features // group_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, n_groups, dtype=dtype), requires_grad=False)
        self.zeros = nn.Parameter(torch.empty(out_features, n_groups, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        packed, scales, zeros = quantize_int4(linear.weight, group_size)
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                         linear.weight.dtype)
        return _filled(module, weight=packed, scales=scales, zeros=zeros, bias=linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_int4(self.weight, self.scales, self.zeros).to(x.dtype), self.bias)

    def pack(self) -> nn.Module:
        """A `PackedInt4Linear` for the device and dtype of this layer's tensors, or this layer itself (with
        a warning that says why) where no PyTorch int4 kernel takes its shape or dtype."""
        kernel, reason = int4_kernel(self.scales.device, self.scales.dtype, self.out_features)
        if kernel is None:
            warnings.warn(f"int4 layers left on the slow dequantize-then-matmul path: {reason}", stacklevel=2)
            return self
        return PackedInt4Linear(self, kernel)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


def int4_kernel(device: torch.device, dtype: torch.dtype, out_features: int) -> tuple[str | None, str]:
    """Which int4 kernel runs a layer ("modelcode-cpu" and "triton": modelcode's own, see kernels/cpu.py and
    kernels/triton_gemv.py; "cpu" or "cuda": PyTorch's), or None and the reason why none does. All need
    in_features % 32 == 0, which every supported group size guarantees."""
    if device.type == "cpu":
        if out_features % 16:
            return None, f"the CPU int4 kernel needs out_features divisible by 16 (got {out_features})"
        if dtype == torch.bfloat16 and out_features % OUTPUTS_PER_BLOCK == 0 and kernels_available():
            return "modelcode-cpu", ""
        return "cpu", ""
    if device.type == "cuda":
        if dtype in GPU_KERNEL_DTYPES and torch.cuda.get_device_capability(device) >= (8, 0) and triton_ready():
            return "triton", ""
        if dtype != torch.bfloat16:
            return None, f"the CUDA int4 kernel takes bfloat16 only (got {dtype}); load with dtype=bfloat16"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return None, "the CUDA int4 kernel needs a GPU of compute capability 8.0 (Ampere) or newer"
        if out_features % 8:
            return None, f"the CUDA int4 kernel needs out_features divisible by 8 (got {out_features})"
        return "cuda", ""
    return None, f"PyTorch has no int4 kernel for {device.type} here"


class PackedInt4Linear(nn.Module):
    """`Int4Linear` with its weight rearranged for an int4 matmul kernel on one device.

    x86 CPU with AVX-512 or AVX2, bfloat16: modelcode's kernel (kernels/cpu.cpp) for up to `INT4_KERNEL_MAX_ROWS`
    rows (decoding), ~1.4x faster than PyTorch's at one row; more rows (prefill) dequantize the weight (in
    C++: with AVX-512 64 outputs at a time, in cache) for a dense bfloat16 matmul, which PyTorch's packed layout
    does not allow.

    CUDA with triton (bfloat16 or float16, Ampere or newer): modelcode's kernel (kernels/triton_gemv.py) on the
    portable layout, scales and zeros side by side in one (out, in/group_size, 2) tensor, for up to
    `INT4_KERNEL_MAX_ROWS` rows of 16-bit activations; more rows dequantize the weight for a dense matmul.

    CPU: `_convert_weight_to_int4pack_for_cpu` / `_weight_int4pack_mm_for_cpu` (float32, bfloat16, float16).
    CUDA without triton: `_convert_weight_to_int4pack` / `_weight_int4pack_mm` (tinygemm; bfloat16, Ampere or
    newer). Scales and zeros travel together as one (in/group_size, out, 2) tensor, the layout both kernels take.

    Speed on CPU: with bfloat16 and one row (decoding) several times faster than a dense bfloat16 matmul;
    but the kernel is built for matrix-vector products (far slower than dense at 256 rows, i.e. prefill) and
    its float32/float16 paths are not vectorized. The packed layout cannot be
    dequantized for a dense matmul, so those cases stay slow: load in bfloat16 for speed.
    """

    kernel_max_rows = INT4_KERNEL_MAX_ROWS

    @property
    def outputs_stack(self) -> bool:
        """Whether its tensors stack along the outputs into one layer of this kind (kernels/fuse.py): in
        modelcode's layouts (CPU, and triton's portable one), not in PyTorch's."""
        return self.kernel in ("modelcode-cpu", "triton")

    def __init__(self, layer: Int4Linear, kernel: str):
        super().__init__()
        self.in_features, self.out_features, self.group_size = layer.in_features, layer.out_features, layer.group_size
        self.kernel = kernel
        if kernel == "triton":
            self.register_buffer("weight", layer.weight.detach())
            self.register_buffer("scales_and_zeros", torch.stack([layer.scales, layer.zeros], dim=-1).detach())
            self.bias = layer.bias
            return
        if kernel == "modelcode-cpu":
            packed, scales_and_zeros = pack_int4(unpack_nibbles(layer.weight), layer.scales, layer.zeros)
            self.register_buffer("weight", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
            self.bias = layer.bias
            return
        if kernel == "cpu":  # takes one int32 per code; its layout does not depend on the inner k-tiles argument
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(layer.weight), 2)
        else:
            # 8 k-tiles of 16 inputs per load is the fastest layout; smaller when in_features is not a multiple.
            inner_k_tiles = next(t for t in (8, 4, 2) if layer.in_features % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(layer.weight.contiguous(), inner_k_tiles)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", torch.stack([layer.scales, layer.zeros], dim=-1).transpose(0, 1)
                             .contiguous())  # (n_groups, out, 2)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel == "triton" and rows.shape[0] <= self.kernel_max_rows and x.dtype in GPU_KERNEL_DTYPES:
            y = triton_gemv().int4_gemv(rows, self.weight, *self.scales_and_zeros.unbind(-1), self.group_size)
        elif self.kernel == "triton":
            y = F.linear(rows, dequantize_int4(self.weight, *self.scales_and_zeros.unbind(-1)).to(x.dtype))
        elif self.kernel == "modelcode-cpu" and x.dtype != torch.bfloat16:
            y = F.linear(rows, dequantize_packed(self.weight, self.scales_and_zeros, self.group_size).to(x.dtype))
        elif self.kernel == "modelcode-cpu":
            mm = int4_mm if rows.shape[0] <= self.kernel_max_rows else int4_prefill_mm
            y = mm(rows, self.weight, self.scales_and_zeros, self.group_size)
        else:
            mm = (torch.ops.aten._weight_int4pack_mm_for_cpu if self.kernel == "cpu"
                  else torch.ops.aten._weight_int4pack_mm)
            y = mm(rows.contiguous(), self.weight, self.group_size, self.scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, kernel={self.kernel}")


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight a quantized layer computes with, in its scales' dtype. PyTorch's own packed int4
    layouts cannot be read back: those raise ValueError."""
    if isinstance(layer, Int8Linear):
        return dequantize_int8(layer.weight, layer.scales)
    if isinstance(layer, PackedInt8Linear):
        return dequantize_int8(unpack_int8(layer.weight), layer.scales)
    if isinstance(layer, Int4Linear):
        return dequantize_int4(layer.weight, layer.scales, layer.zeros)
    if isinstance(layer, PackedInt4Linear) and layer.kernel == "modelcode-cpu":
        return dequantize_packed(layer.weight, layer.scales_and_zeros, layer.group_size)
    if isinstance(layer, PackedInt4Linear) and layer.kernel == "triton":
        return dequantize_int4(layer.weight, *layer.scales_and_zeros.unbind(-1))
    raise ValueError(f"cannot read back the weight of {layer!r}: PyTorch's packed layout is internal to it")


def _filled(module: nn.Module, **tensors: torch.Tensor | None) -> nn.Module:
    """`module` with its (frozen) parameters set to the given tensors."""
    for name, t in tensors.items():
        if t is not None:
            setattr(module, name, nn.Parameter(t.detach(), requires_grad=False))
    return module
