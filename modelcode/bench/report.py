"""A benchmark's results as a table for the terminal and a plot of tokens/s against batch size."""

from pathlib import Path

from modelcode.bench.speculation import describe


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(result: dict) -> str:
    s, m = result["settings"], result["model"]
    quantized = f" {m['quantize']} (head {m.get('quantize_head') or 'unquantized'})" if m["quantize"] else ""
    head = (f"{m['name']}  {m['dtype']}{quantized}"
            f"{'  compiled' if s['compile'] else ''}  |  {m['parameters'] / 1e6:.1f}M parameters, "
            f"{m['weight_bytes_per_step'] / 1e9:.3f} GB of weights per step  |  prompt {s['prompt_len']}, "
            f"{s['new_tokens']} new tokens, median of {s['repeats']}  |  roofline "
            f"{result['roofline_gbps']:.1f} GB/s on {result['machine']['torch_threads']} threads (median of readings "
            f"before each run: {result['roofline_range_gbps'][0]:.1f}-{result['roofline_range_gbps'][1]:.1f})")
    cols = ["batch", "impl", "prefill tok/s", "decode tok/s", "TTFT ms", "GB/s", "% roofline", "peak GB", "decode x"]
    gpu = any("gpu_ms_per_step" in r["ours"] for r in result["results"])  # on a GPU: its time beside the wall's
    cols += ["step ms", "GPU ms"] if gpu else []
    lines = []
    for r in result["results"]:
        for impl in ("ours", "transformers"):
            x = r.get(impl)
            if x is None:
                continue
            lines.append([str(r["batch"]), impl, _fmt(x["prefill_tok_s"], ".1f"), _fmt(x["decode_tok_s"], ".1f"),
                          _fmt(x["ttft_ms"], ".1f"), _fmt(x["gbps"], ".1f"), _fmt(x["roofline_pct"], ".0f"),
                          _fmt(x["peak_memory_gb"], ".2f"),
                          _fmt(r.get("decode_speedup"), ".2f") if impl == "ours" else ""])
            if gpu:
                lines[-1] += [_fmt(1e3 * r["batch"] / x["decode_tok_s"], ".2f"), _fmt(x.get("gpu_ms_per_step"), ".2f")]
    widths = [max(len(c), *(len(row[i]) for row in lines)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    out = [head, fmt.format(*cols), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in lines]
    if "speculative" in result:
        out.append(describe(result["speculative"]))
    return "\n".join(out)


def plot(result: dict, path: str | Path) -> Path:
    """Decode tokens/s (all sequences together) against batch size, ours and transformers', log-log."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = result["results"]
    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for impl, style in (("ours", "o-"), ("transformers", "s--")):
        if all(impl in r for r in rows):
            ax.plot(batches, [r[impl]["decode_tok_s"] for r in rows], style, label=f"{impl} generate")
    m, s = result["model"], result["settings"]
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s (whole batch)",
           title=f"{m['name']} {m['dtype'].removeprefix('torch.')}{' ' + m['quantize'] if m['quantize'] else ''}"
                 f"{' compiled' if s['compile'] else ''} on {result['machine'].get('gpu', 'CPU')}")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
