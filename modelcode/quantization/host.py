"""Whether a quantized layer decodes faster than bfloat16 on this machine, and bfloat16 layers where it does not.

A quantized weight streams in fewer bytes but costs more arithmetic per byte, so on a CPU whose cores are slow
beside its memory the quantized kernel can lose to the bfloat16 one (see BENCHMARKS.md). Decoding should never
be slower for having quantized, so before the decoding kernels are installed, each mode's layer is timed once
per machine against a bfloat16 layer of the same shape, on weights too large for the caches (on huge pages, as
decoding keeps them), and where the quantized one loses, the model's layers of that mode are dequantized to
bfloat16: more memory, faster steps.
The timings are kept per CPU model and kernel build; MODELCODE_KEEP_QUANTIZED=1 keeps the quantized layers.
"""

import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from modelcode.kernels import Installed, install_cpu_kernels, install_gpu_kernels
from modelcode.kernels.cpu import build_directory, cpuinfo
from modelcode.kernels.linear import pack_bf16_linears
from modelcode.kernels.pages import move_to_huge_pages
from modelcode.quantization.linear import Int4Linear, Int8Linear, PackedInt4Linear, dequantized_weight
from modelcode.quantization.quantize import QUANTIZED, layer_scheme
from modelcode.swap import replace_module

SHAPE = (2048, 2048)  # (out, in): a typical decoder projection
STACK_BYTES = 512 * 2**20  # bfloat16 weights timed per pass: more than the last-level cache of most CPUs


@dataclass(frozen=True)
class Timing:
    """Seconds for one row through the same stack of layers, quantized and in bfloat16."""

    quantized_s: float
    bf16_s: float

    @property
    def quantized_wins(self) -> bool:
        return self.quantized_s < self.bf16_s


def mode_of(layer: nn.Module) -> str | None:
    """ "int8" or "int4" for a quantized CPU layer with bfloat16 scales (what the decoding kernels take) whose weight
    can be read back, else None."""
    if not isinstance(layer, QUANTIZED):
        return None
    scales = layer.scales_and_zeros if isinstance(layer, PackedInt4Linear) else layer.scales
    readable = not isinstance(layer, PackedInt4Linear) or layer.kernel == "modelcode-cpu"  # PyTorch's layout is not
    return layer_scheme(layer).mode if readable and scales.is_cpu and scales.dtype == torch.bfloat16 else None


def measure(mode: str, stack_bytes: int = STACK_BYTES) -> Timing:
    """Time one row through a stack of `SHAPE` layers in `mode` (as `pack()` makes them here) and through the
    same stack in bfloat16 (packed for modelcode's kernel where it runs): the best of 5 alternating passes."""
    out_features, in_features = SHAPE
    n = max(1, stack_bytes // (2 * out_features * in_features))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(1, in_features, dtype=torch.bfloat16)
    quantized = Int8Linear.from_linear(linear) if mode == "int8" else Int4Linear.from_linear(linear, 32)
    # n copies, each its own memory: every pass streams them all
    stacks = {kind: nn.ModuleList([layer] + [copy.deepcopy(layer) for _ in range(n - 1)])
              for kind, layer in (("quantized", quantized.pack()), ("bf16", linear))}
    pack_bf16_linears(stacks["bf16"])
    for layers in stacks.values():  # where decoding keeps its weights (`install_cpu_kernels`)
        move_to_huge_pages(layers)
    best = {k: float("inf") for k in stacks}
    with torch.inference_mode():
        for _ in range(5):
            for kind, layers in stacks.items():
                start = time.perf_counter()
                for layer in layers:
                    layer(x)
                best[kind] = min(best[kind], time.perf_counter() - start)
    return Timing(best["quantized"], best["bf16"])


def timings_file() -> Path:
    """Where this machine's timings are kept: beside the kernels' build, per CPU model and flags."""
    cpu = hashlib.sha256(f"{cpuinfo('model name')}|{cpuinfo('flags')}".encode()).hexdigest()[:16]
    return build_directory() / f"quantized-speed-{cpu}.json"


def timing(mode: str) -> Timing:
    """`measure(mode)`, once per machine (saying so): later calls read it back."""
    path = timings_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if mode in known:
        return Timing(**known[mode])
    print(f"modelcode: timing the {mode} kernel against bfloat16 on this CPU, once ...", end="", file=sys.stderr,
          flush=True)
    known[mode] = asdict(measure(mode))
    print(" done", file=sys.stderr)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1))
    except OSError:  # a read-only cache: measured again next time
        pass
    return Timing(**known[mode])


def dequantized(layer: nn.Module) -> nn.Linear:
    """A quantized layer as a bfloat16 `nn.Linear` holding its dequantized weight (the values it computes with)."""
    with torch.device("meta"):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    linear.weight = nn.Parameter(dequantized_weight(layer).to(torch.bfloat16), requires_grad=False)
    linear.bias = layer.bias
    return linear


def unquantize_where_slower(model: nn.Module) -> int:
    """Dequantize to bfloat16, in place, the model's quantized CPU layers of each mode whose kernel decodes
    slower than bfloat16's here (saying so); returns how many layers. MODELCODE_KEEP_QUANTIZED=1: none."""
    if os.environ.get("MODELCODE_KEEP_QUANTIZED") == "1":
        return 0
    layers = [(name, m, mode) for name, m in model.named_modules() if (mode := mode_of(m))]
    losing = set()
    for mode in sorted({mode for _, _, mode in layers}):
        t = timing(mode)
        if not t.quantized_wins:
            losing.add(mode)
            print(f"modelcode: on this CPU the {mode} kernel decodes slower than bfloat16 ({t.quantized_s * 1e3:.1f} "
                  f"against {t.bf16_s * 1e3:.1f} ms per {STACK_BYTES >> 20} MiB of bfloat16 weights; {timings_file()})"
                  f", so the {mode} layers run in bfloat16 (MODELCODE_KEEP_QUANTIZED=1 keeps them {mode}, using less "
                  "memory)", file=sys.stderr)
    chosen = [(name, m) for name, m, mode in layers if mode in losing]
    for name, m in chosen:
        replace_module(model, name, dequantized(m))
    return len(chosen)


def prepare_decoding(model: nn.Module) -> Installed:
    """What compiled decoding (and the engine, on CPU) runs on: on CPU, quantized layers slower here than
    bfloat16 dequantized (`unquantize_where_slower`), then modelcode's kernels installed
    (`kernels.install_cpu_kernels`); on CUDA, `kernels.install_gpu_kernels`."""
    if next(model.parameters()).device.type == "cuda":
        return install_gpu_kernels(model)
    unquantize_where_slower(model)
    return install_cpu_kernels(model)
