"""The engine's continuous batching against the same requests run one after another through `lm.generate`.

    python benchmarks/serving.py [--preset llama-1b] [--dtype bfloat16] [--requests 16] [--new-tokens 32]
                                 [--prompt-len 32 512] [--rate 0] [--concurrency 1 4 16]

Random weights of a named shape (or --model FOLDER), greedy, every request `--new-tokens` long (no stop
ids). The requests arrive at once (--rate 0) or as a Poisson stream of --rate requests/s. For each engine
concurrency (max_batch_size): output tokens/s, time to first token and inter-token latency (p50, p99),
peak KV blocks in use and prefix-cache hits; beside them `lm.generate` of each prompt alone, in turn, in
the same run. Writes benchmarks/results/serving.json and serving.png (throughput and p99 inter-token
latency against concurrency).
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch

import modelcode
from modelcode.bench.subjects import random_model
from modelcode.engine import Engine, SamplingParams
from modelcode.lm import LM

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def load(args) -> LM:
    dtype = getattr(torch, args.dtype)
    if args.model:
        return modelcode.load(args.model, dtype=dtype)
    model = random_model(args.preset, dtype, torch.device("cpu"))
    return LM(model, model.config, Path(args.preset))


def make_requests(args, vocab: int) -> list[tuple[list[int], float]]:
    """(prompt, arrival time in seconds from the start) for each request."""
    rng = random.Random(0)
    t, out = 0.0, []
    for _ in range(args.requests):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(*args.prompt_len))]
        out.append((prompt, t))
        t += rng.expovariate(args.rate) if args.rate > 0 else 0.0
    return out


def run_engine(lm: LM, requests, new_tokens: int, concurrency: int) -> dict:
    engine = Engine(lm, max_batch_size=concurrency)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    start, pending, ids = time.perf_counter(), list(enumerate(requests)), {}
    arrival, token_times, peak_blocks = {}, {}, 0
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][1][1] <= now:
            i, (prompt, at) = pending.pop(0)
            ids[engine.add_request(prompt, params)] = i
            arrival[i] = start + at
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0][1][1] - now))
            continue
        outs = engine.step()
        stamp = time.perf_counter()
        peak_blocks = max(peak_blocks, engine.stats().kv_blocks_used)
        for out in outs:
            times = token_times.setdefault(ids[out.request_id], [])
            times += [stamp] * (len(out.token_ids) - len(times))
    elapsed = time.perf_counter() - start
    ttft = [token_times[i][0] - arrival[i] for i in token_times]
    itl = [b - a for times in token_times.values() for a, b in zip(times, times[1:])]
    stats = engine.stats()
    return dict(concurrency=concurrency, seconds=elapsed, output_tokens_per_s=stats.generated_tokens / elapsed,
                ttft_p50=percentile(ttft, 50), ttft_p99=percentile(ttft, 99), itl_p50=percentile(itl, 50),
                itl_p99=percentile(itl, 99), peak_kv_blocks=peak_blocks, kv_blocks_total=stats.kv_blocks_total,
                prefix_hit_tokens=stats.prefix_hit_tokens, preemptions=stats.preemptions)


def run_one_by_one(lm: LM, requests, new_tokens: int) -> dict:
    start = time.perf_counter()
    for prompt, _ in requests:
        lm.generate([prompt], max_new_tokens=new_tokens, stop_ids=frozenset())
    elapsed = time.perf_counter() - start
    return dict(seconds=elapsed, output_tokens_per_s=len(requests) * new_tokens / elapsed)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["engine"]
    c = [r["concurrency"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(c, [r["output_tokens_per_s"] for r in runs], "o-", label="engine")
    a.axhline(results["one_by_one"]["output_tokens_per_s"], color="gray", ls="--", label="lm.generate, one by one")
    a.set(xlabel="concurrency (max batch size)", ylabel="output tokens/s", xscale="log")
    a.legend()
    b.plot(c, [r["itl_p99"] * 1000 for r in runs], "o-", color="C1")
    b.set(xlabel="concurrency (max batch size)", ylabel="p99 inter-token latency (ms)", xscale="log")
    fig.suptitle(f"{results['model']} {results['dtype']}, {results['requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--model", help="a checkpoint folder instead of random weights")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(32, 512))
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s of a Poisson stream; 0: all at once")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    args = ap.parse_args()
    lm = load(args)
    requests = make_requests(args, lm.config.vocab_size)
    lm.generate([requests[0][0][:8]], max_new_tokens=2)  # warm up (and build the CPU kernels, where they run)
    results = dict(model=args.model or args.preset, dtype=args.dtype, requests=args.requests,
                   new_tokens=args.new_tokens, prompt_len=list(args.prompt_len), rate=args.rate,
                   threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
                   one_by_one=run_one_by_one(lm, requests, args.new_tokens),
                   engine=[run_engine(lm, requests, args.new_tokens, c) for c in args.concurrency])
    base = results["one_by_one"]["output_tokens_per_s"]
    print(f"lm.generate one by one: {base:.1f} output tok/s")
    print("| concurrency | output tok/s | vs one by one | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | peak KV blocks |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results["engine"]:
        print(f"| {r['concurrency']} | {r['output_tokens_per_s']:.1f} | {r['output_tokens_per_s'] / base:.2f}x | "
              f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} | "
              f"{r['peak_kv_blocks']} / {r['kv_blocks_total']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
