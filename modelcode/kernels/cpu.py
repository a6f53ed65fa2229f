"""modelcode's own decoding kernels for x86 CPUs, built for the instruction set the CPU has: with AVX-512
(BF16 and VNNI), `cpu.cpp`, where they are explained: bfloat16 weights times any number of rows of bfloat16
activations (from 5 rows on, on the AMX tile unit where the CPU has one: `amx.cpp`), int8 and int4 weights times
a few, and attention for one query per sequence (`attention.cpp`); with AVX2 and FMA, `cpu_avx2.cpp`: the same
matmuls on the same layouts (decoding's attention stays PyTorch's). Built on first use by PyTorch's C++
extension tools; and the weight layouts they read.

The build takes ~25 s once per machine (cached under ~/.cache/modelcode/, keyed by the sources, see
`build_directory`) and needs a C++ compiler, as torch.compile on CPU does. Where the CPU has neither instruction
set, the build fails, or MODELCODE_NO_CPU_KERNELS is set, PyTorch's own kernels run instead;
MODELCODE_CPU_KERNELS=avx2 builds the AVX2 kernels on a CPU that has AVX-512 too.
"""

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

NAME = "modelcode_cpu_kernels"
OUTPUTS_PER_BLOCK = 64  # the kernels compute outputs 64 at a time: out_features must be a multiple


@dataclass(frozen=True)
class Build:
    """One instruction set's build of the kernels: the flags the CPU must report, the compiler's, the sources."""

    label: str  # as people write the instruction set
    cpu_flags: tuple[str, ...]
    compiler_flags: tuple[str, ...]
    sources: tuple[str, ...]
    attention: bool  # whether it has the decode-attention kernel

    def paths(self) -> list[str]:
        return [str(Path(__file__).with_name(name)) for name in self.sources]


BUILDS = {  # the first whose flags the CPU reports is built
    "avx512": Build("AVX-512", ("avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"),
                    ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-fopenmp"),
                    ("ops.cpp", "cpu.cpp", "attention.cpp", "amx.cpp"), True),
    "avx2": Build("AVX2", ("avx2", "fma", "f16c"), ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"),
                  ("ops.cpp", "cpu_avx2.cpp"), False),
}
HEADERS = [Path(__file__).with_name(name) for name in ("bf16.h", "amx.h", "ops.h")]


def cpuinfo(field: str) -> str:
    """A field of the first CPU in the (Linux) kernel's /proc/cpuinfo ("flags", "vendor_id"); empty elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), "")


def cpu_flags() -> set[str]:
    """The instruction-set flags the CPU reports."""
    return set(cpuinfo("flags").split())


def instruction_set() -> str | None:
    """Which build of the kernels (a key of BUILDS) runs here: MODELCODE_CPU_KERNELS's where set, else the first
    whose flags the CPU reports; None where none does."""
    chosen = os.environ.get("MODELCODE_CPU_KERNELS")
    if chosen and chosen not in BUILDS:
        raise ValueError(f"MODELCODE_CPU_KERNELS={chosen!r}: give {' or '.join(BUILDS)} (or unset it to choose by "
                         "the CPU)")
    flags = cpu_flags()
    return chosen or next((name for name, build in BUILDS.items() if set(build.cpu_flags) <= flags), None)


def chosen_build() -> Build:
    """The build `instruction_set` names (the AVX-512 one where none fits: it is not built then)."""
    return BUILDS[instruction_set() or "avx512"]


def prefetch_variable(kernel: str) -> str:
    """The environment variable that tells the library how the kernel ("bf16", "int8", "int4") prefetches."""
    return f"MODELCODE_{kernel.upper()}_PREFETCH"


QUANTIZED_PREFETCH = {  # vendor -> kernel -> how its weights are asked for ahead, "hint:bytes" (see ops.h)
    "AuthenticAMD": {"int8": "nta:8192", "int4": "nta:8192"},
    "": {"int8": "t1:4096", "int4": "t0:2048"},  # Intel's, and every other vendor's cores
}


def quantized_prefetch(kernel: str) -> str:
    """How the int8 or int4 kernel asks for weights ahead (see ops.h), "hint:bytes", as MODELCODE_INT8_PREFETCH or
    MODELCODE_INT4_PREFETCH says, else by the CPU's vendor: non-temporally 8 KB ahead on AMD's cores; on Intel's
    server cores, where non-temporal lines stream at half speed, int4 2 KB ahead into L1 ("t0:2048"), int8 4 KB
    ahead into L2 ("t1:4096")."""
    variable = prefetch_variable(kernel)
    vendor = cpuinfo("vendor_id")
    chosen = os.environ.get(variable) or QUANTIZED_PREFETCH.get(vendor, QUANTIZED_PREFETCH[""])[kernel]
    hint, _, ahead = chosen.partition(":")
    if hint not in ("nta", "t0", "t1") or not ahead.isdigit() or int(ahead) % 64 or int(ahead) > 65536:
        raise ValueError(f"{variable}={chosen!r}: give nta, t0 or t1 and the bytes ahead, a multiple of 64 up to "
                         "65536 (\"t0:2048\"), or unset it to choose by the CPU")
    return chosen


def bf16_prefetch() -> str:
    """How the bfloat16 kernel asks for weights ahead (see cpu.cpp), as MODELCODE_BF16_PREFETCH says, else by the
    CPU: not at all ("none") on AMD's Zen 4 (family 25), whose hardware prefetcher alone streams faster, a run ahead
    into L2 ("t1") elsewhere."""
    zen4 = cpuinfo("vendor_id") == "AuthenticAMD" and cpuinfo("cpu family") == "25"
    chosen = os.environ.get(prefetch_variable("bf16")) or ("none" if zen4 else "t1")
    if chosen not in ("none", "t1"):
        raise ValueError(f"MODELCODE_BF16_PREFETCH={chosen!r}: give none or t1 (or unset it to choose by the CPU)")
    return chosen


def build_directory() -> Path:
    """Where this copy of the kernels is built: keyed by a hash of the sources, the build flags and the torch
    and Python versions, so installs of different sources never rebuild each other's, and alike ones share."""
    build = chosen_build()
    key = hashlib.sha256()
    for part in [*(Path(f).read_bytes() for f in [*build.paths(), *HEADERS]), *map(str.encode, build.compiler_flags),
                 torch.__version__.encode(), sys.version.encode()]:
        key.update(part)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "modelcode" / f"cpu-kernels-{key.hexdigest()[:16]}"


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on `path` (flock: released when this process ends, however it ends), where the file
    system has locks."""
    import fcntl

    with open(path, "w") as f:
        with contextlib.suppress(OSError):  # a file system without locks (some network mounts): build unguarded
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@functools.cache
def kernels_available() -> bool:
    """Build (once per machine, saying so) and load the kernels once per process; False where they cannot run
    here. A failed build is recorded next to where it would be, and says so in one line once."""
    if why_unavailable():  # switched off, the wrong CPU, or a build that failed (and said so) before
        return False
    from torch.utils.cpp_extension import load

    # The library reads it once as it loads, so the choice is made here, for this process and what it starts.
    os.environ.update({prefetch_variable(kernel): how for kernel, how in (
        ("bf16", bf16_prefetch()), ("int8", quantized_prefetch("int8")), ("int4", quantized_prefetch("int4")))})
    build, folder = chosen_build(), build_directory()
    failed = folder / "build-failed.log"
    folder.mkdir(parents=True, exist_ok=True)
    built = (folder / f"{NAME}.so").exists()
    start = time.perf_counter()
    if not built:
        print("modelcode: building the CPU kernels, once (about 30 s) ...", end="", file=sys.stderr, flush=True)
    try:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on the PATH")
        with exclusive(folder / "build.flock"):
            # PyTorch's own lock is a file that a build killed midway leaves behind, and every later process then
            # waits for it forever; ours is released by the OS when its process dies, and while we hold it no
            # build is running, so theirs can only be stale.
            (folder / "lock").unlink(missing_ok=True)
            load(NAME, build.paths(), extra_cflags=list(build.compiler_flags), extra_ldflags=["-fopenmp"],
                 build_directory=str(folder), is_python_module=False)
    except Exception as e:  # no compiler, no headers, ...: PyTorch's own kernels still work
        failed.write_text(str(e))
        print(" failed" if not built else "", file=sys.stderr)
        print(f"modelcode: the CPU kernels could not be built ({str(e).splitlines()[0][:80]}); PyTorch's kernels "
              f"run instead. Details: {failed} (delete it to try again)", file=sys.stderr)
        return False
    if not built:
        print(f" done in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    @torch.library.register_fake("modelcode::bf16_mm")
    def _(x, w):  # the output's shape, for torch.compile
        return x.new_empty(x.shape[0], w.shape[0] * OUTPUTS_PER_BLOCK)

    @torch.library.register_fake("modelcode::int8_mm")
    def _(x, w, scales):
        return x.new_empty(x.shape[0], w.shape[0] * OUTPUTS_PER_BLOCK)

    @torch.library.register_fake("modelcode::int4_mm")
    def _(x, w, sz, group_size):  # the output's shape, for torch.compile
        return x.new_empty(x.shape[0], w.shape[0] * OUTPUTS_PER_BLOCK)

    @torch.library.register_fake("modelcode::int8_prefill_mm")
    def _(x, w, scales):
        return x.new_empty(x.shape[0], w.shape[0] * OUTPUTS_PER_BLOCK)

    @torch.library.register_fake("modelcode::int4_prefill_mm")
    def _(x, w, sz, group_size):
        return x.new_empty(x.shape[0], w.shape[0] * OUTPUTS_PER_BLOCK)

    @torch.library.register_fake("modelcode::int4_dequantize")
    def _(w, sz, group_size):
        return sz.new_empty(w.shape[0] * OUTPUTS_PER_BLOCK, w.shape[1] * 8)

    if build.attention:
        @torch.library.register_fake("modelcode::decode_attention")
        def _(q, k, v, mask):
            return torch.empty_like(q, memory_format=torch.contiguous_format)

    return True


@functools.cache
def loaded_build() -> Build | None:
    """The build this process loaded (fixed once loaded: the CPU is not asked again), None where the kernels do not
    run here."""
    return chosen_build() if kernels_available() else None


def loaded_prefetch() -> dict[str, str] | None:
    """How each kernel prefetches in this process, as the library read it when it loaded; None where the kernels
    do not run here."""
    return {kernel: os.environ[prefetch_variable(kernel)] for kernel in ("bf16", "int8", "int4")} \
        if loaded_build() else None


def why_unavailable() -> str | None:
    """Why `kernels_available` says no here, in one line; None where it says yes or has not tried to build."""
    if os.environ.get("MODELCODE_NO_CPU_KERNELS"):
        return "MODELCODE_NO_CPU_KERNELS is set"
    isa = instruction_set()
    if isa is None:
        return "this CPU has neither AVX-512 (BF16, VNNI) nor AVX2 with FMA"
    if missing := set(BUILDS[isa].cpu_flags) - cpu_flags():
        return f"this CPU lacks {', '.join(sorted(missing))} (MODELCODE_CPU_KERNELS={isa})"
    failed = build_directory() / "build-failed.log"
    if failed.exists():
        return f"the build failed ({failed}): {failed.read_text().strip()[-300:]}"
    return None


def amx_available() -> bool:
    """Whether `bf16_mm` runs batches and prompts on AMX here (see amx.cpp; MODELCODE_NO_AMX=1 says no)."""
    return kernels_available() and torch.ops.modelcode.amx_ready()


def attention_kernel_available() -> bool:
    """`kernels_available` with the decode-attention kernel (the AVX-512 build), which torch.compile takes as a
    constant of the graph (it reads files): compiling marks it so (`generation/compile.py`), not this module,
    whose import would otherwise import dynamo (~1.5 s)."""
    build = loaded_build()
    return build is not None and build.attention


def decode_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `decode_attention` takes these: on CPU, bfloat16 or float32, a head size of 16, 32, ..., 128 or
    256, keys and values laid out alike with rows contiguous, a mask shared by the heads, nothing to
    differentiate."""
    hd = q.shape[-1]
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32) and q.dtype == k.dtype == v.dtype
            and hd % 16 == 0 and (hd <= 128 or hd == 256) and k.stride(-1) == 1 and k.stride() == v.stride()
            and (mask is None or mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1)
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and attention_kernel_available())


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax(q k^T / sqrt(hd)) v for one query per sequence: q (B, H, 1, hd), k and v (B, KV, S, hd), mask
    (boolean, broadcast to (B, 1, 1, S)) -> (B, H, 1, hd)."""
    if mask is not None:
        mask = mask.expand(k.shape[0], 1, 1, k.shape[2]).reshape(k.shape[0], k.shape[2])
    return torch.ops.modelcode.decode_attention(q, k, v, mask)


def pack_lanes(weight: torch.Tensor, inputs_per_lane: int) -> torch.Tensor:
    """(out, in) weight -> (out/64, in/p, 4, 16, p): for each p inputs and each block of 16 outputs, output i's
    values of those p inputs in lane i, what one `vdpbf16ps` (p = 2, bfloat16) or `vpdpbusd` (p = 4, int8 bytes)
    multiplies with p activations broadcast to every lane."""
    n, k = weight.shape
    p = inputs_per_lane
    return weight.view(n // 64, 4, 16, k // p, p).permute(0, 3, 1, 2, 4).contiguous()


def unpack_lanes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_lanes`."""
    blocks, runs, _, _, p = packed.shape
    return packed.permute(0, 2, 3, 1, 4).reshape(blocks * 64, runs * p)


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) bfloat16 weight -> `bf16_mm`'s layout: (out/64, in/2, 4, 16, 2)."""
    return pack_lanes(weight, 2)


def bf16_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(M, K) bfloat16 activations x the packed bfloat16 weight -> (M, N) bfloat16."""
    return torch.ops.modelcode.bf16_mm(x, w)


def int8_fits(in_features: int, out_features: int) -> bool:
    """Whether `int8_mm` takes a weight of this shape (it reads inputs 128 at a time, outputs 64)."""
    return in_features % 128 == 0 and out_features % OUTPUTS_PER_BLOCK == 0


def pack_int8(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 weight -> `int8_mm`'s layout: (out/64, in/4, 4, 16, 4) uint8, each code q stored as 128 + q
    (its top bit flipped), the unsigned operand `vpdpbusd` takes."""
    return pack_lanes(weight, 4).view(torch.uint8) ^ 0x80


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int8`: the (out, in) int8 weight."""
    return unpack_lanes(packed ^ 0x80).view(torch.int8)


def int8_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, K) bfloat16 activations x the packed int8 weight, times (N,) bfloat16 row scales -> (M, N) bfloat16: for a
    few rows (decoding)."""
    return torch.ops.modelcode.int8_mm(x, w, scales)


def int8_prefill_mm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`int8_mm` for many rows (a prompt), by way of the bfloat16 weight q s, as `int4_prefill_mm`."""
    return torch.ops.modelcode.int8_prefill_mm(x, w, scales)


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) codes in [0, 15], (out, in/gs) scales and zeros -> `int4_mm`'s weight and scales layout."""
    n, k = codes.shape
    # input 8c + 4e + 2h + p of a run -> nibble h of byte e of word 2i + p (see cpu.cpp)
    q = codes.to(torch.uint8).view(n // 64, 4, 16, k // 8, 2, 2, 2)  # [64-block, 16-block, i, run, e, h, p]
    q = q.permute(0, 3, 1, 2, 6, 4, 5)  # [64-block, run, 16-block, i, p, e, h]
    w = (q[..., 0] | (q[..., 1] << 4)).reshape(n // 64, k // 8, 4, 64).contiguous()
    sz = torch.stack([scales, zeros]).view(2, n // 64, 64, -1).permute(1, 3, 0, 2).contiguous()
    return w, sz


def unpack_int4(w: torch.Tensor, sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `pack_int4`: (codes, scales, zeros)."""
    blocks, runs = w.shape[:2]
    q = torch.stack([w & 0xF, w >> 4], dim=-1).view(blocks, runs, 4, 16, 2, 2, 2)  # [.., i, p, e, h]
    codes = q.permute(0, 2, 3, 1, 5, 6, 4).reshape(blocks * 64, runs * 8)
    scales, zeros = sz.permute(2, 0, 3, 1).reshape(2, blocks * 64, -1)
    return codes, scales, zeros


def dequantize_packed(w: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """The (out, in) bfloat16 weight of the kernel's layout, for a dense matmul over many rows (prefill)."""
    return torch.ops.modelcode.int4_dequantize(w, sz, group_size)


def int4_mm(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """(M, K) bfloat16 activations x the packed int4 weight -> (M, N) bfloat16: for a few rows (decoding)."""
    return torch.ops.modelcode.int4_mm(x, w, sz, group_size)


def int4_prefill_mm(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """`int4_mm` for many rows (a prompt): with AVX-512, 64 outputs at a time dequantized to bfloat16 in cache and
    multiplied as `bf16_mm` multiplies (AMX where the CPU has it); with AVX2, the weight dequantized whole for
    PyTorch's matmul."""
    return torch.ops.modelcode.int4_prefill_mm(x, w, sz, group_size)
