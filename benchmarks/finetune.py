"""Fine-tuning speed and memory: LoRA and full fine-tuning of a preset shape with random weights (default
llama-1b), modelcode beside transformers (+ peft for LoRA) taking the same optimizer steps on the same batch.

Each subject runs in its own process (so peak memory is its own): the model in bfloat16, one batch of random
token ids, AdamW; the first step is a warmup, the rest are timed. LoRA: r=8, alpha=16, dropout 0.05 on q and v,
the adapters in the base's dtype on both sides (peft's autocast_adapter_dtype=False). Tokens/s counts the
batch's tokens per optimizer step (forward + backward + update); peak memory is the process's peak resident
set on CPU, PyTorch's peak allocation on a GPU. On a shared machine whose speed drifts, separate runs compare
badly, so LoRA is also timed with both taking turns step by step in one process on the same frozen base tensors
(`--rounds`): the ratio to quote is the median of those rounds' own ratios. `--prompt-share` masks the start of
each sequence from the loss, as an SFT batch masks its prompt. Writes benchmarks/results/finetune-<preset>.json
(finetune-<preset>-sft.json with a prompt share).

    python benchmarks/finetune.py                       # llama-1b, 256 tokens, 4 steps, lora and full
    python benchmarks/finetune.py --methods lora --prompt-share 0.5
    python benchmarks/finetune.py --methods lora --device cuda --preset llama-3-8b
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def subject(impl: str, method: str, model, tokens: torch.Tensor, prompt: int = 0):
    """(the model to train, a function computing its loss on `tokens`, the first `prompt` of each sequence masked
    from the loss as an SFT batch's prompt is). `model` is our random model; transformers' twin shares its weight
    tensors."""
    from modelcode.loading.weight_maps import llama as llama_maps
    from modelcode.training import LoRAConfig, apply_lora
    from modelcode.training.data import IGNORE
    from modelcode.training.loop import loss_sum, n_targets

    labels = tokens.clone()  # transformers' labels: the tokens, the prompt masked; each side shifts them itself
    labels[:, :prompt] = IGNORE
    if impl == "transformers":
        import peft

        from modelcode.bench.subjects import hf_twin

        hf = hf_twin(model)
        if method == "lora":
            hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                         target_modules=["q_proj", "v_proj"]),
                                     autocast_adapter_dtype=False)
        return hf, lambda: hf(input_ids=tokens, labels=labels).loss
    if method == "lora":
        apply_lora(model, LoRAConfig(), llama_maps.HF)
    targets = torch.cat([labels[:, 1:], torch.full((tokens.shape[0], 1), IGNORE, device=tokens.device)], dim=1)
    batch = {"tokens": tokens, "positions": torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens),
             "targets": targets}
    count = n_targets(batch)
    return model, lambda: loss_sum(model, batch, autocast=False) / count


def trainer(model, loss, method: str):
    """One optimizer step as a function: forward, backward, AdamW; returns the loss."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step() -> float:
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(value)  # a host sync: the step is done when it is read

    return step, sum(p.numel() for p in params)


def prompt_tokens(args) -> int:
    return round(args.prompt_share * args.seq_len)


def one(impl: str, method: str, args) -> dict:
    """Train `args.steps` steps in this process; returns its tokens/s and peak memory."""
    from modelcode.bench.measure import peak_memory, reset_peak_memory
    from modelcode.bench.subjects import random_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = random_model(args.preset, torch.bfloat16, device)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device)
    step, trainable = trainer(*subject(impl, method, model, tokens, prompt_tokens(args)), method)
    reset_peak_memory(device)
    seconds, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        seconds.append(time.perf_counter() - start)
    timed = seconds[1:]
    return {"impl": impl, "method": method, "tokens_per_s": args.batch * args.seq_len / statistics.median(timed),
            "step_seconds": timed, "peak_memory_gb": peak_memory(device), "first_loss": losses[0],
            "trainable_params": trainable}


def interleaved_lora(args) -> dict:
    """LoRA steps of both, alternating in one process on the same frozen base tensors, so that a machine whose
    speed drifts moves both alike: the median of the rounds' own ratios (ours over theirs, tokens/s)."""
    from modelcode.bench.subjects import random_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = random_model(args.preset, torch.bfloat16, device)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device)
    prompt = prompt_tokens(args)
    theirs, _ = trainer(*subject("transformers", "lora", model, tokens, prompt), "lora")  # the twin before the wrapping
    ours, _ = trainer(*subject("modelcode", "lora", model, tokens, prompt), "lora")
    ours(), theirs()  # warmup
    ratios, times = [], {"modelcode": [], "transformers": []}
    for r in range(args.rounds):
        order = (("modelcode", ours), ("transformers", theirs)) if r % 2 == 0 else \
            (("transformers", theirs), ("modelcode", ours))
        for name, step in order:
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
        ratios.append(times["transformers"][-1] / times["modelcode"][-1])
    return {"rounds": args.rounds, "ratio_median": statistics.median(ratios), "ratios": ratios,
            "step_seconds": times}


def run(impl: str, method: str, args) -> dict:
    """One subject in a process of its own (its peak memory is its own)."""
    cmd = [sys.executable, __file__, "--one", impl, method, "--preset", args.preset, "--seq-len", str(args.seq_len),
           "--batch", str(args.batch), "--prompt-share", str(args.prompt_share), "--steps", str(args.steps),
           "--device", args.device, "--rounds", str(args.rounds)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{impl} {method} failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    if impl != "both":
        print(f"{method:5} {impl:13} {r['tokens_per_s']:8.1f} tok/s  peak {r['peak_memory_gb']:6.2f} GB  "
              f"trainable {r['trainable_params']:,}", flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-share", type=float, default=0.0,
                        help="share of each sequence that is prompt, masked from the loss (SFT batches: ~0.5)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps, the first one a warmup")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=4, help="alternating LoRA steps of both, in one process")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args) if args.one[0] != "both" else interleaved_lora(args)))
        return
    rows = [run(impl, method, args) for method in args.methods for impl in ("modelcode", "transformers")]
    for method in args.methods:
        ours, theirs = (next(r for r in rows if r["method"] == method and r["impl"] == i)
                        for i in ("modelcode", "transformers"))
        print(f"{method}: modelcode {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x transformers' tokens/s "
              f"(separate runs), {ours['peak_memory_gb'] / theirs['peak_memory_gb']:.2f}x its peak memory")
    interleaved = run("both", "lora", args) if "lora" in args.methods and args.rounds else None
    if interleaved:
        print(f"lora, alternating steps in one process: modelcode {interleaved['ratio_median']:.2f}x transformers' "
              f"tokens/s (median of {args.rounds} rounds: {', '.join(f'{r:.2f}' for r in interleaved['ratios'])})")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"finetune-{args.preset}{'-sft' if args.prompt_share else ''}.json"
    import transformers

    out.write_text(json.dumps({"args": vars(args) | {"one": None}, "rows": rows, "interleaved_lora": interleaved,
                               "machine": platform.processor()
                               or platform.machine(), "torch": torch.__version__,
                               "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
