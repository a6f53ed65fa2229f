"""Quantized decoding beside bfloat16 on the same random weights, interleaved in one run.

The speed-up of int8 or int4 over bfloat16 is a ratio of two measurements; on a machine whose memory
bandwidth drifts while it runs (a shared VM), two `modelcode bench` runs minutes apart can differ by more
than the effect. So here every variant is built, compiled and warmed up first, then each round of timed
runs decodes once with every variant, the bandwidth read just before each run (`modelcode.bench`'s
`warm_up`, `timed_runs` and `Roofline`), and the speed-ups are medians of the rounds' own ratios.

    python benchmarks/quantized.py [--model llama-1b] [--variants bf16 int8 int4 int4-int4-head] [--repeats 5]

Variants, by how their layers and their output head are stored: bf16; int8 (head int8: the default);
int8-bf16-head; int4 (group 32, head int8: the default); int4-bf16-head; int4-int4-head; int4-g128 (head int8).
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from modelcode.bench.measure import Roofline, run_ours
from modelcode.bench.run import Settings, kv_bytes, machine, summarize, timed_runs, warm_up
from modelcode.bench.subjects import random_model, weight_bytes
from modelcode.generation.compile import CompiledModel
from modelcode.quantization import quantize
from modelcode.quantization.host import prepare_decoding

VARIANTS = {  # name -> (mode, group size, `quantize`'s head: None int8, True the layers' mode, False bf16)
    "bf16": None,
    "int8": ("int8", None, None),
    "int8-bf16-head": ("int8", None, False),
    "int4": ("int4", 32, None),
    "int4-bf16-head": ("int4", 32, False),
    "int4-int4-head": ("int4", 32, True),
    "int4-g128": ("int4", 128, None),
}


def build(preset: str, variant: str, slots: int) -> tuple[CompiledModel, int]:
    """The variant's compiled model of random weights (the same seed for all: the same weights), and the
    bytes of weights one decode step reads."""
    model = random_model(preset, torch.bfloat16, torch.device("cpu")).eval().requires_grad_(False)
    if VARIANTS[variant] is not None:
        mode, group_size, head = VARIANTS[variant]
        quantize(model, mode, group_size, head=head)
    prepare_decoding(model)
    return CompiledModel(model, slots), weight_bytes(model)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b", help="a preset shape (random weights)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="the first is the base of the speed-ups")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/llama-1b-quantized.json")
    args = parser.parse_args()
    s = Settings(model=args.model, compile=True, batch_sizes=(1,), prompt_len=args.prompt_len,
                 new_tokens=args.new_tokens, repeats=args.repeats, hf=False)
    slots = args.prompt_len + args.new_tokens
    subjects, step_bytes = {}, {}
    for variant in args.variants:
        runner, w_bytes = build(args.model, variant, slots)
        subjects[variant] = (runner, run_ours)
        step_bytes[variant] = w_bytes + kv_bytes(runner.config, 1, slots, torch.bfloat16.itemsize)
    config = next(iter(subjects.values()))[0].config
    rows = {1: dict(batch=1)}
    warm_up(subjects, rows, s, config, torch.device("cpu"), print)  # compiles each variant
    roofline = Roofline(torch.device("cpu"))
    timed = timed_runs(subjects, rows, s, config, roofline)
    results = {}
    for variant in args.variants:  # as `modelcode bench` does for each batch size, plus the speed-up
        results[variant] = dict(bytes_per_step=step_bytes[variant])
        summarize(results[variant], timed[1, variant], step_bytes[variant], batch=1)
    base = args.variants[0]
    for r in results.values():
        r["speedup"] = statistics.median(run["decode_tok_s"] / b["decode_tok_s"]
                                         for run, b in zip(r["runs"], results[base]["runs"]))
    print(f"{args.model}, batch 1, compiled, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of "
          f"{args.repeats} interleaved rounds; roofline {min(roofline.readings):.1f}-{max(roofline.readings):.1f} GB/s")
    print(f"{'variant':>16} {'decode tok/s':>12} {'GB/step':>8} {'GB/s':>6} {'% roofline':>10} {f'vs {base}':>8} "
          f"{'TTFT ms':>8}")
    for variant, r in results.items():
        print(f"{variant:>16} {r['decode_tok_s']:12.1f} {r['bytes_per_step'] / 1e9:8.3f} {r['gbps']:6.1f} "
              f"{r['roofline_pct']:10.0f} {r['speedup']:7.2f}x {r['ttft_ms']:8.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(settings=vars(args), machine=machine(torch.device("cpu")),
                                   roofline_readings_gbps=roofline.readings, results=results), indent=1) + "\n")
    print(f"wrote {out} and {plot(json.loads(out.read_text()), out.with_suffix('.png'))}")


def plot(result: dict, path: Path) -> Path:
    """Decode tokens/s per variant, each bar labelled with its speed-up over the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, rows = list(result["results"]), list(result["results"].values())
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    bars = ax.bar(names, [r["decode_tok_s"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['speedup']:.2f}x, {r['roofline_pct']:.0f}%", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    s = result["settings"]
    ax.set(ylabel="decode tokens/s (batch 1)", title=f"{s['model']} compiled on {result['machine']['cpu']}: "
           "speed-up over the first, % of the roofline")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
