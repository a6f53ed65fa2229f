"""Where decoding time goes: the bandwidth of one-row matmuls (GEMV), layer shape by layer shape.

Decoding one token multiplies one activation row by every weight matrix, so a decode step is about as fast
as these kernels stream weights. For each Linear shape of a preset (default: llama-1b) this times a stack
of such layers, large enough to come from memory rather than cache where the shape allows, with each
kernel the decode step may use: eager `F.linear` (bf16), the compiled step's choice (inductor with frozen
weights and autotuning, as `--compile` does), modelcode's own bf16 kernel (bf16-modelcode: the layers
`--compile` runs on x86 CPUs with AVX-512 or AVX2), and the int8 / int4 layers of `modelcode.quantization`
(modelcode's kernels where they run; int8-pytorch: PyTorch's `_weight_int8pack_mm` in the same run;
MODELCODE_NO_CPU_KERNELS=1 for PyTorch's int4 too), eager and compiled.
Bandwidth counts the weight bytes (codes, scales and zeros) read per call.

    python benchmarks/gemv.py [--preset llama-1b] [--kernels bf16 bf16-modelcode int8 int8-pytorch int4] [--compile]
        [--huge-pages]
        [--out benchmarks/results/gemv-llama-1b.json]
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from modelcode.bench.measure import read_bandwidth
from modelcode.bench.run import machine
from modelcode.kernels.cpu import why_unavailable
from modelcode.kernels.pages import move_to_huge_pages
from modelcode.loading import build

RESULTS = Path(__file__).parent / "results"


class Stack(nn.Module):
    """`n` Linear layers applied to the same row; each output feeds a running sum, so none is dead code."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = x.new_zeros(())
        for layer in self.layers:
            acc = acc + layer(x)[..., 0].sum()
        return acc


def linear_shapes(preset: str) -> list[tuple[int, int]]:
    """(out, in) of every distinct Linear shape of the preset, output head included."""
    model = build(preset=preset).model  # on the meta device
    return sorted({(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear)})


def stack(shape: tuple[int, int], n: int, kernel: str) -> Stack:
    out_features, in_features = shape
    layers = []
    for _ in range(n):
        layer = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
        nn.init.normal_(layer.weight, std=0.02)
        layers.append(layer)
    model = Stack(layers).eval().requires_grad_(False)
    if kernel == "bf16-modelcode":
        from modelcode.kernels import pack_bf16_linears

        if not pack_bf16_linears(model):
            raise SystemExit(f"modelcode's bf16 kernel does not run on this machine ({why_unavailable()})")
    elif kernel != "bf16":
        from modelcode.quantization import quantize

        # int8-pytorch: the portable layers, unpacked, run PyTorch's `_weight_int8pack_mm`, in the same run as ours
        quantize(model, kernel.removesuffix("-pytorch"), 32, pack=kernel != "int8-pytorch")
    return model


def seconds(fn, x: torch.Tensor, repeats: int = 5) -> float:
    """Median time of fn(x)."""
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--kernels", nargs="+", default=["bf16", "bf16-modelcode", "int8", "int8-pytorch", "int4"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--huge-pages", action="store_true", help="the weights on 2 MB pages, as compiled decoding "
                        "puts them (`kernels.pages`)")
    parser.add_argument("--gb", type=float, default=0.6, help="bf16 bytes per stack, at most 64 layers")
    parser.add_argument("--out", type=Path, help="the JSON file of the rows (default: "
                        "benchmarks/results/gemv-PRESET.json)")
    args = parser.parse_args()
    out = args.out or RESULTS / f"gemv-{args.preset}.json"
    rows = []
    roofline = read_bandwidth(torch.device("cpu"))
    print(f"roofline (sum of a 1 GiB float32 tensor): {roofline:.1f} GB/s on {torch.get_num_threads()} threads")
    print(f"{'kernel':>14} {'shape (out, in)':>16} {'layers':>6} {'eager GB/s':>10} {'compiled GB/s':>13} "
          f"{'us/layer eager':>14} {'us/layer compiled':>17}")
    for kernel in args.kernels:
        for shape in linear_shapes(args.preset):
            n = max(1, min(64, int(args.gb * 1e9 / (shape[0] * shape[1] * 2))))
            model = stack(shape, n, kernel)
            if args.huge_pages:
                move_to_huge_pages(model)
            x = torch.randn(1, shape[1], dtype=torch.bfloat16)
            nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            eager = seconds(model, x)
            compiled = float("nan")
            if args.compile:
                from torch._inductor import config

                torch._dynamo.reset()
                step = torch.compile(model, fullgraph=True, dynamic=False)
                with config.patch(freezing=True, max_autotune=True, max_autotune_report_choices_stats=False,
                                  autotune_num_choices_displayed=0):
                    step(x)
                compiled = seconds(step, x)
            print(f"{kernel:>14} {str(shape):>16} {n:>6} {nbytes / eager / 1e9:>10.1f} "
                  f"{nbytes / compiled / 1e9:>13.1f} {eager / n * 1e6:>14.0f} {compiled / n * 1e6:>17.0f}", flush=True)
            rows.append(dict(kernel=kernel, shape=shape, layers=n, eager_gb_s=nbytes / eager / 1e9,
                             compiled_gb_s=None if math.isnan(compiled) else nbytes / compiled / 1e9))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(settings=vars(args) | dict(out=str(out)), roofline_gb_s=roofline,
                                   machine=machine(torch.device("cpu")), rows=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
