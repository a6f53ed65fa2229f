"""Triton kernels for decoding with weight-only quantized matrices: a few rows of activations x (M, K), M = 1..16,
times a weight W (N, K) kept in 8 or 4 bits, y = x W^T (M, N) in the activations' dtype. Each equals the plain
computation, `dequantize_int8` / `dequantize_int4` (quantization/linear.py) then a float32 matmul, up to the order
of float32 additions.

Layouts, read as the portable layers store them (nothing is rearranged):
- int8: codes q (N, K) int8, row-major, one scale per row (N,).  W[n, k] = q[n, k] * scale[n].
- int4: codes packed (N, K/2) uint8, row-major, input 2j in the high nibble of byte j and 2j + 1 in the low one;
  a scale and a zero per group of G inputs of a row.  W[n, k] = (q[n, k] - 8) * scale[n, k // G] + zero[n, k // G].

Why it is fast: a decoding matmul reads every weight once for two flops per row, so the bytes a weight takes set
its time (int8: half of bfloat16's, int4: a quarter). Each program owns a block of output rows and walks along K,
loading its rows' codes as contiguous runs, turning them into x's 16-bit type in registers (the codes, less 8 for
int4, are small integers: exact) and feeding them with 16 rows of activations to the tensor cores (`tl.dot`, which
becomes `mma.sync` m16n8k16), accumulating in float32. Rows of x beyond M are masked to zero, so 1 to 16 rows read
the same bytes. For int4, x's even and odd columns are loaded apart to meet the high and low nibbles, so no
shuffle puts the codes back in order, and each group's scale and zero are applied once per output and row:
sum_k x_k W_k = scale * sum_k x_k (q_k - 8) + zero * sum_k x_k. Float32 activations work too (the dot then runs
on the CUDA cores and spills registers): layers send them elsewhere.

CPU tensors run the same kernels under Triton's interpreter (slowly: how they are checked without a GPU) where
TRITON_INTERPRET=1 was set before triton was first imported (torch.compile imports it).
"""

import torch

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = ""
except Exception as error:  # not installed, or an install that does not load: the launchers say which
    triton = tl = None
    _IMPORT_ERROR = f"triton does not import ({type(error).__name__}: {error}); pip install triton"

BLOCK_M = 16  # activation rows per tile: the fewest a tensor-core dot takes
BLOCKS_N = (64, 32, 16)  # outputs per program, widest first
INT8_STEP_CODES = 4096  # codes per program per loop step (BLOCK_N x BLOCK_K): 4 warps hold them without spilling
INT4_STEP = 256  # inputs per loop step of the int4 kernel, in whole groups


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether triton imports here: the kernels then run on CUDA tensors (and on CPU ones under its interpreter)."""
    return not _IMPORT_ERROR


def why_triton_unavailable() -> str:
    """Why `triton_available()` is False; empty where it is True."""
    return _IMPORT_ERROR


def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter, on CPU tensors: TRITON_INTERPRET=1 when triton was first
    imported (from then on triton's own library functions are compiled or interpreted, and so are these)."""
    return triton is not None and not any(isinstance(f, triton.runtime.JITFunction) for f in (tl.sum,
                                                                                               _int8_gemv_kernel))


if triton is not None:

    @triton.jit
    def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_s, stride_ym,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          FLOAT32_DOT: tl.constexpr):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        x_rows = x_ptr + rm[:, None] * stride_xm
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # N * K can pass 2^31
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
            q = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k[None, :] < K), other=0)  # (BLOCK_N, BLOCK_K)
            if FLOAT32_DOT:
                x = x.to(tl.float32)
            acc = tl.dot(x, tl.trans(q.to(x.dtype)), acc, input_precision="ieee")
        scale = tl.load(s_ptr + rn * stride_s, mask=n_ok, other=0.0).to(tl.float32)
        y = (acc * scale[None, :]).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_sg,
                          stride_zn, stride_zg, stride_ym, GROUP: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLOAT32_DOT: tl.constexpr):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        x_rows = x_ptr + rm[:, None] * stride_xm
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
        byte = tl.arange(0, GROUP // 2)  # within one group of a row: inputs 2 * byte and 2 * byte + 1
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g0 in range(0, K // GROUP, GROUPS_PER_STEP):
            for j in tl.static_range(GROUPS_PER_STEP):
                b = (g0 + j) * (GROUP // 2) + byte
                packed = tl.load(w_rows + b[None, :], mask=n_ok[:, None], other=0)  # (BLOCK_N, GROUP / 2)
                x_even = tl.load(x_rows + 2 * b[None, :], mask=m_ok[:, None], other=0.0)  # (BLOCK_M, GROUP / 2)
                x_odd = tl.load(x_rows + 2 * b[None, :] + 1, mask=m_ok[:, None], other=0.0)
                if FLOAT32_DOT:
                    x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
                high = ((packed >> 4).to(tl.int8) - 8).to(x_even.dtype)  # q - 8 of the even inputs
                low = ((packed & 0xF).to(tl.int8) - 8).to(x_even.dtype)
                dot = tl.dot(x_even, tl.trans(high), input_precision="ieee")
                dot = tl.dot(x_odd, tl.trans(low), dot, input_precision="ieee")  # sum_k x_k (q_k - 8)
                x_sum = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=1)
                scale = tl.load(s_ptr + rn * stride_sn + (g0 + j) * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
                zero = tl.load(z_ptr + rn * stride_zn + (g0 + j) * stride_zg, mask=n_ok, other=0.0).to(tl.float32)
                acc += dot * scale[None, :] + x_sum[:, None] * zero[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block_n: int | None = None) -> torch.Tensor:
    """x (M, K) @ (q * scales[:, None]).T for int8 codes q (N, K) and scales (N,): (M, N) in x's dtype.
    `block_n`: outputs per program (default: `default_block_n`)."""
    _check_inputs("int8_gemv", x, q, torch.int8, q.shape[1])
    if scales.shape != (q.shape[0],):
        raise ValueError(f"int8_gemv: scales of shape {tuple(scales.shape)} for {q.shape[0]} output rows")
    _check_runnable("int8_gemv", x)
    (m, k), n = x.shape, q.shape[0]
    x, y = x.contiguous(), x.new_empty(m, n)
    block_n = block_n or default_block_n(n, x.device)
    block_k = max(16, min(INT8_STEP_CODES // block_n, triton.next_power_of_2(k)))
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, BLOCK_M))
    _int8_gemv_kernel[grid](x, q, scales, y, m, n, k, x.stride(0), q.stride(0), scales.stride(0), y.stride(0),
                            BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, FLOAT32_DOT=_float32_dot(x),
                            num_warps=4, num_stages=4)
    return y


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              block_n: int | None = None) -> torch.Tensor:
    """x (M, K) @ W.T for W (N, K) kept as `Int4Linear` keeps it: packed codes (N, K/2) uint8 (even input in the
    high nibble), scales and zeros (N, K/group_size), which may be strided views; (M, N) in x's dtype.
    `block_n`: outputs per program (default: `default_block_n`)."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    _check_inputs("int4_gemv", x, packed, torch.uint8, k)
    if group_size < 32 or group_size & (group_size - 1) or k % group_size:
        raise ValueError(f"int4_gemv: group_size {group_size} must be a power of two, at least 32, dividing "
                         f"in_features={k}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (n, k // group_size):
            raise ValueError(f"int4_gemv: {name} of shape {tuple(t.shape)}, expected {(n, k // group_size)}")
    _check_runnable("int4_gemv", x)
    m = x.shape[0]
    x, y = x.contiguous(), x.new_empty(m, n)
    block_n = block_n or default_block_n(n, x.device)
    per_step = max(1, INT4_STEP // group_size)  # small groups several to a step: longer runs of each row per step
    while (k // group_size) % per_step:
        per_step //= 2
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, BLOCK_M))
    _int4_gemv_kernel[grid](x, packed, scales, zeros, y, m, n, k, x.stride(0), packed.stride(0), *scales.stride(),
                            *zeros.stride(), y.stride(0), GROUP=group_size, GROUPS_PER_STEP=per_step,
                            BLOCK_M=BLOCK_M, BLOCK_N=block_n, FLOAT32_DOT=_float32_dot(x), num_warps=4,
                            num_stages=3)
    return y


def default_block_n(n: int, device: torch.device) -> int:
    """Outputs per program: the widest block that still gives each SM two programs (one's loads in flight while
    the other computes), else the narrowest. No split-K: only the smallest layers (N = 1024: 64 programs of 16)
    leave SMs idle, and their few MB stream in about the time that split-K's extra launches (zeroing a float32
    buffer, converting it after the atomic adds) would take."""
    programs = 2 * _sm_count(device)
    return next((b for b in BLOCKS_N if triton.cdiv(n, b) >= programs), BLOCKS_N[-1])


@torch.compiler.assume_constant_result
def _sm_count(device: torch.device) -> int:
    # On CPU (the interpreter) the blocks are chosen as for an H100's 132 SMs.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _float32_dot(x: torch.Tensor) -> bool:
    # The interpreter holds bfloat16 as raw 16-bit integers and does no arithmetic on them, so on CPU the dot takes
    # float32. Both sum the same products: codes and bfloat16 activations are exact in either, and their products
    # exact in the float32 accumulator.
    return x.dtype == torch.float32 or not x.is_cuda


def _check_inputs(name: str, x: torch.Tensor, w: torch.Tensor, w_dtype: torch.dtype, k: int) -> None:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{name}: activations of shape {tuple(x.shape)}, expected (rows, {k})")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: activations in {x.dtype}; give float32, bfloat16 or float16")
    if w.dtype != w_dtype or w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"{name}: weight codes must be a 2-D {w_dtype} tensor with contiguous rows (got "
                         f"{w.dtype}, shape {tuple(w.shape)}, strides {w.stride()})")
    if x.device != w.device:
        raise ValueError(f"{name}: activations on {x.device}, weight on {w.device}")


def _check_runnable(name: str, x: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError(f"{name} needs triton: {_IMPORT_ERROR}")
    if not x.is_cuda and not interpreted():
        raise RuntimeError(f"{name}: {x.device.type} tensors run only under Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is first imported (torch.compile imports it)")
