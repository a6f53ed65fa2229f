"""`modelcode serve` under concurrent HTTP clients, beside the engine driven directly, in one run.

    python benchmarks/serve.py [--preset llama-1b] [--dtype bfloat16] [--requests 4] [--new-tokens 32]
                               [--prompt-len 128] [--concurrency 1 4 16 64] [--repeats 3]

One model (random weights of a named shape; the Llama 2 tokenizer of tests/assets turns ids into text) in
this process, served by uvicorn in a thread; the clients run in a child process (aiohttp), so they do not
share this process's interpreter lock. For each concurrency C, C streaming clients send max(C, --requests)
completions of --prompt-len random token ids, --new-tokens each (ignore_eos, greedy), pulling from one queue:
output tokens/s over the wall time, time to first token and inter-token latency (p50, p99) as the clients
see them. Beside it, the same model's engine alone (benchmarks/serving.py's step loop) runs the same
requests with max_batch_size C. Served and alone alternate for --repeats rounds; each figure is the median of
the rounds, and "served / alone" the median of the rounds' own ratios: what HTTP, SSE and the asyncio front
cost. Writes benchmarks/results/serve.json.
"""

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import torch
from serving import percentile, run_engine

from modelcode.bench.subjects import random_model
from modelcode.lm import LM
from modelcode.tokenization import load_chat_format, load_tokenizer

RESULTS = Path(__file__).parent / "results"
TOKENIZER = Path(__file__).parents[1] / "tests" / "assets" / "tokenizers" / "llama2-tokenizer"


def build_lm(preset: str, dtype: str) -> LM:
    model = random_model(preset, getattr(torch, dtype), torch.device("cpu"))
    tok = load_tokenizer(TOKENIZER)
    if model.config.vocab_size != tok.vocab_size:
        raise ValueError(f"{preset} has {model.config.vocab_size} token ids, the Llama 2 tokenizer "
                         f"{tok.vocab_size}: pick a preset with Llama 2's vocabulary (llama-1b)")
    return LM(model, model.config, Path(preset), tok, load_chat_format(TOKENIZER, tok), stop_ids=tok.stop_ids)


def make_prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


async def one(session: aiohttp.ClientSession, url: str, prompt: list[int], new_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, stamps, tokens = time.perf_counter(), [], 0
    async with session.post(f"{url}/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["usage"]:
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return dict(ttft=stamps[0] - sent, itl=[b - a for a, b in zip(stamps, stamps[1:])], tokens=tokens)


async def drive(url: str, prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict:
    queue, results = list(prompts), []

    async def client(session):
        while queue:
            results.append(await one(session, url, queue.pop(), new_tokens))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=7200)) as session:
        start = time.perf_counter()
        await asyncio.gather(*[client(session) for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    ttft, itl = [r["ttft"] for r in results], [x for r in results for x in r["itl"]]
    return dict(output_tokens_per_s=sum(r["tokens"] for r in results) / elapsed, ttft_p50=percentile(ttft, 50),
                ttft_p99=percentile(ttft, 99), itl_p50=percentile(itl, 50), itl_p99=percentile(itl, 99))


def served(url: str, args, n: int, concurrency: int, new_tokens: int) -> dict:
    """The clients, in a child process: its result is the last line it prints."""
    cmd = [sys.executable, __file__, "--drive", url, "--requests", str(n), "--concurrency", str(concurrency),
           "--new-tokens", str(new_tokens), "--prompt-len", str(args.prompt_len), "--vocab", str(args.vocab)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def measure(lm: LM, url: str, args, c: int) -> dict:
    n = max(c, args.requests)
    prompts = [(p, 0.0) for p in make_prompts(n, args.prompt_len, args.vocab)]
    rounds = []
    for _ in range(args.repeats):
        s = served(url, args, n, c, args.new_tokens)
        alone = run_engine(lm, prompts, args.new_tokens, c)["output_tokens_per_s"]
        rounds.append(dict(s, alone_output_tokens_per_s=alone, served_vs_alone=s["output_tokens_per_s"] / alone))
    return dict(concurrency=c, requests=n, rounds=rounds,
                **{k: statistics.median(r[k] for r in rounds) for k in rounds[0]})


def start_server(lm: LM, max_batch_size: int) -> str:
    import threading

    import uvicorn

    from modelcode.engine import Engine
    from modelcode.serving import create_app

    app = create_app(lambda: Engine(lm, max_batch_size=max_batch_size), "bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while app.state.server.engine is None:
        time.sleep(0.1)
    return url


def write(args, runs: list[dict]) -> None:
    results = dict(model=args.preset, dtype=args.dtype, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                   repeats=args.repeats, threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
                   runs=sorted(runs, key=lambda r: r["concurrency"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=4, help="requests at least, per concurrency")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    ap.add_argument("--drive", help=argparse.SUPPRESS)  # the child process: the server's URL
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive:
        prompts = make_prompts(args.requests, args.prompt_len, args.vocab)
        return print(json.dumps(asyncio.run(drive(args.drive, prompts, args.new_tokens, args.concurrency[0]))))
    lm = build_lm(args.preset, args.dtype)
    args.vocab = lm.config.vocab_size
    url = start_server(lm, max(args.concurrency))  # its engine installs the CPU kernels on lm, for both
    served(url, args, 2, 2, 2)  # warm up both
    run_engine(lm, [(p, 0.0) for p in make_prompts(2, args.prompt_len, args.vocab)], 2, 2)
    print("| concurrency | requests | served tok/s | engine alone tok/s | served / alone | TTFT p50 / p99 (s) | "
          "ITL p50 / p99 (ms) |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    runs = []
    for c in args.concurrency:
        r = measure(lm, url, args, c)
        runs.append(r)
        print(f"| {c} | {r['requests']} | {r['output_tokens_per_s']:.1f} | {r['alone_output_tokens_per_s']:.1f} | "
              f"{r['served_vs_alone']:.2f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
              f"{r['itl_p50'] * 1e3:.0f} / {r['itl_p99'] * 1e3:.0f} |", flush=True)
        write(args, runs)  # after each concurrency, so a long run keeps what it measured
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
