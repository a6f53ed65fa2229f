"""Tensor parallelism on CPU: decode speed, each rank's peak memory and the collectives' time per step, at
TP 1 and TP 2, on a random checkpoint of a preset's shape (default llama-1b) written to a temporary folder.

    python benchmarks/tp.py [--preset llama-1b] [--dtype bfloat16] [--tp 1 2] [--threads-per-rank N]
                            [--new-tokens 32] [--folder DIR] [--out tp.json]

Each TP size is its own `torchrun --standalone` launch of this file (`--worker`), so each rank's peak resident
memory (ru_maxrss) is its own process's, from startup through loading and decoding. The CPU's cores are shared
out: TP N gives each rank cores / N threads (or --threads-per-rank), so every launch uses the same cores. The
collectives' time per step is measured apart, on tensors of a decode step's shapes: one all-reduce of (1, 1, dim)
per attention and per MLP of each layer, one for the embedding and an all-gather of the logits (what
`modelcode/parallel/` runs). --folder keeps the checkpoint there (written once, reused when it exists) instead of
a temporary folder.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def write_checkpoint(preset: str, dtype: torch.dtype, folder: Path) -> None:
    """A Hugging Face folder (config.json + model.safetensors) of random weights of the preset's shape."""
    from safetensors.torch import save_file

    from modelcode.bench.subjects import hf_config, random_model, to_hf_names
    from modelcode.loading.weight_maps import llama as llama_maps

    model = random_model(preset, dtype, torch.device("cpu"))
    state = to_hf_names({n: p.contiguous() for n, p in model.named_parameters()}, llama_maps.HF)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = hf_config(model.config)
    config.torch_dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def collective_ms_per_step(config, dtype: torch.dtype, repeats: int = 200) -> float:
    """Milliseconds a decode step (batch 1) spends in the all-reduces and the logits' all-gather."""
    import torch.distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return 0.0
    x = torch.ones(1, 1, config.dim, dtype=dtype)
    logits = torch.ones(1, 1, config.vocab_size // world, dtype=dtype)
    gathered = [torch.empty_like(logits) for _ in range(world)]
    calls = 2 * config.n_layers + 1
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        for _ in range(calls):
            dist.all_reduce(x)
        dist.all_gather(gathered, logits)
    return (time.perf_counter() - start) / repeats * 1e3


def worker(folder: str, tp: int, dtype: str, prompt_len: int, new_tokens: int, repeats: int, threads: int) -> None:
    """One rank of a TP launch: load this rank's share, decode, and (rank 0) print one JSON line of results."""
    import torch.distributed as dist

    import modelcode
    from modelcode.bench.measure import run_ours

    torch.set_num_threads(threads)
    lm = modelcode.load(folder, dtype=dtype, tp=tp)
    loaded_gb = peak_rss_gb()
    prompt = torch.randint(0, lm.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    run_ours(lm.model, prompt.tolist(), 4)  # warm-up
    runs = [run_ours(lm.model, prompt.tolist(), new_tokens) for _ in range(repeats)]
    decode_tok_s = statistics.median(r.decode_tok_s for r in runs)
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # TP 1 under torchrun: a group of one, to gather the figures alike
    collectives = collective_ms_per_step(lm.config, lm.model.norm.weight.dtype)
    figures = dict(peak_rss_gb=peak_rss_gb(), loaded_rss_gb=loaded_gb,
                   parameters=sum(p.numel() for p in lm.model.parameters()))
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, figures)
    if dist.get_rank() == 0:
        step_ms = 1e3 / decode_tok_s
        print(json.dumps(dict(tp=tp, threads_per_rank=threads, decode_tok_s=decode_tok_s, step_ms=step_ms,
                              collectives_ms_per_step=collectives, tokens=runs[-1].tokens[0], ranks=ranks)))


def launch(folder: Path, tp: int, args) -> dict:
    threads = args.threads_per_rank or max(1, (os.cpu_count() or 1) // tp)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), __file__,
           "--worker", str(folder), "--tp-size", str(tp), "--dtype", args.dtype, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(threads)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"TP {tp} failed:\n{run.stderr[-4000:]}")
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))


def report(results: list[dict]) -> str:
    base = results[0]
    lines = ["| TP | threads/rank | decode tok/s | step ms | collectives ms/step | peak RSS per rank GB | "
             "of TP 1's | same tokens |", "|---|---|---|---|---|---|---|---|"]
    base_rss = max(r["peak_rss_gb"] for r in base["ranks"])
    for r in results:
        rss = [x["peak_rss_gb"] for x in r["ranks"]]
        lines.append(f"| {r['tp']} | {r['threads_per_rank']} | {r['decode_tok_s']:.2f} | {r['step_ms']:.1f} | "
                     f"{r['collectives_ms_per_step']:.2f} | {' / '.join(f'{x:.2f}' for x in rss)} | "
                     f"{max(rss) / base_rss:.0%} | {r['tokens'] == base['tokens']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads-per-rank", type=int)
    p.add_argument("--folder")
    p.add_argument("--out", default="tp.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tp-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.tp_size, args.dtype, args.prompt_len, args.new_tokens, args.repeats,
                      args.threads)
    from modelcode.bench.run import machine

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        if not (folder / "model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            write_checkpoint(args.preset, getattr(torch, args.dtype), folder)
            print(f"wrote a random {args.preset} checkpoint ({args.dtype}) in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
        results = [launch(folder, tp, args) for tp in args.tp]
    out = dict(preset=args.preset, dtype=args.dtype, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
               machine=machine(torch.device("cpu")), results=results)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
