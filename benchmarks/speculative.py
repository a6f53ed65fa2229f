"""Speculative decoding vs plain decoding on the embedded TinyStories-656K, side by side in one run.

    python benchmarks/speculative.py [--threads 1] [--new-tokens 128] [--repeats 3]
        [--out benchmarks/results/tinystories-speculative.json]

Wall-clock tokens/s of greedy decoding (all methods emit the same tokens), the median of interleaved
repeats, with the acceptance rate and tokens per target pass. The drafts are made from the target
itself (there is no smaller TinyStories model): its first layer alone, and a copy with 5% noise.
"""

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import modelcode
from modelcode.bench.run import machine
from modelcode.generation.speculative import speculative_generate
from modelcode.models.llama import Llama

RESULTS = Path(__file__).parent / "results"

PROMPTS = ["Once upon a time", "Tom and Lily went to the park. They saw a", "One day, a bird",
           'Lily said, "Can I play?" Max said, "Yes, you can play." Lily said, "Can I play?" Max said,']


def first_layer_only(model: Llama) -> Llama:
    draft = Llama(dataclasses.replace(model.config, n_layers=1))
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("layers.1.")})
    return draft.eval()


def noisy_copy(model, scale: float):
    draft, g = copy.deepcopy(model), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return draft


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", nargs="*", default=PROMPTS, help="the prompts (default: four stories)")
    ap.add_argument("--out", type=Path, default=RESULTS / "tinystories-speculative.json", help="the JSON of the rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = modelcode.load("tinystories-656k")
    prompts = [lm.tokenizer.encode(p, bos=True) for p in args.prompt]
    n, none = args.new_tokens, frozenset()
    methods = {
        "plain greedy": None,
        "draft = target itself, k=4": dict(draft=lm.model, speculate_k=4),
        "draft = target + 5% noise, k=4": dict(draft=noisy_copy(lm.model, 0.05), speculate_k=4),
        "draft = first layer, k=2": dict(draft=first_layer_only(lm.model), speculate_k=2),
        "prompt lookup n=3, k=4": dict(prompt_lookup=3, speculate_k=4),
        "prompt lookup n=3, k=8": dict(prompt_lookup=3, speculate_k=8),
    }
    times = {m: [] for m in methods}
    stats = {}
    for _ in range(args.repeats):
        for name, kw in methods.items():  # interleaved, so load changes hit every method alike
            start = time.perf_counter()
            if kw is None:
                tokens = [lm.generate([p], max_new_tokens=n, temperature=0.0, stop_ids=none)[0][0] for p in prompts]
            else:
                outs = [speculative_generate(lm.model, p, n, stop_ids=none, **kw) for p in prompts]
                tokens = [o.tokens for o in outs]
                stats[name] = [o.stats for o in outs]
            times[name].append(time.perf_counter() - start)
            assert sum(map(len, tokens)) == n * len(prompts)
    base = n * len(prompts) / statistics.median(times["plain greedy"])
    print(f"TinyStories-656K, CPU, {args.threads} thread(s), {len(prompts)} prompts x {n} greedy tokens, "
          f"median of {args.repeats}")
    print(f"{'method':34} {'tokens/s':>9} {'speed-up':>9} {'accepted':>9} {'tok/pass':>9}")
    rows = []
    for name in methods:
        tps = n * len(prompts) / statistics.median(times[name])
        if name in stats:
            acc = sum(s.accepted for s in stats[name]) / max(sum(s.proposed for s in stats[name]), 1)
            per_pass = n * len(prompts) / sum(s.target_passes for s in stats[name])
            print(f"{name:34} {tps:9.0f} {tps / base:8.2f}x {acc:9.1%} {per_pass:9.2f}")
        else:
            acc, per_pass = None, 1.0
            print(f"{name:34} {tps:9.0f} {1:8.2f}x {'':>9} {1:9.2f}")
        rows.append(dict(method=name, tokens_per_s=tps, speed_up=tps / base, accepted=acc,
                         tokens_per_target_pass=per_pass))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(settings=vars(args) | dict(out=str(args.out)),
                                        machine=machine(torch.device("cpu")), rows=rows), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
