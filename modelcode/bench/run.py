"""One benchmark: a model, a set of batch sizes, ours and transformers' `generate` on the same weights."""

import datetime
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from modelcode.api import EMBEDDED, resolve_path
from modelcode.bench.measure import (
    median_run,
    peak_memory,
    read_bandwidth,
    reset_peak_memory,
    run_hf,
    run_ours,
)
from modelcode.bench.subjects import hf_twin, random_model, weight_bytes
from modelcode.generation.compile import CompiledModel
from modelcode.loading import load_model, resolve_dtype
from modelcode.models import registry


@dataclass
class Settings:
    model: str | None = None  # folder, embedded name or preset name (random weights); None: the embedded model
    dtype: str | None = None  # None: the checkpoint's own (bfloat16 for presets)
    device: str = "cpu"
    compile: bool = False
    freeze: bool = True  # with compile on CPU: weights compiled in as constants (a second copy of them)
    autotune: bool = True  # with compile and freeze: let inductor time its own GEMM kernels (slower to compile)
    steps_per_call: int | None = None  # with compile: decode steps per compiled call (None: by model size)
    quantize: str | None = None  # "int8" or "int4"
    group_size: int = 32
    quantize_head: bool = False  # also quantize an untied output head
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    prompt_len: int = 128
    new_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    hf: bool = True
    threads: int | None = None
    seed: int = 0


def build(s: Settings) -> tuple[torch.nn.Module, str, Path | None]:
    """A fresh, unquantized model for the settings: (model, its name, its folder if it has one)."""
    device = torch.device(s.device)
    name = s.model or "tinystories-656k"
    folder = resolve_path(name)
    if folder.is_dir():
        model, _, _ = load_model(folder, dtype=s.dtype, device=device)
        return model, folder.name, folder
    if name in registry.PRESETS:
        return random_model(name, resolve_dtype(s.dtype, "bfloat16"), device, s.seed), f"{name} (random)", None
    raise ValueError(f"no model {name!r}: give a checkpoint folder, an embedded model ({', '.join(EMBEDDED)}) "
                     f"or a preset for random weights ({', '.join(sorted(registry.PRESETS))})")


def kv_bytes(config, batch: int, slots: float, element_size: int) -> float:
    """Bytes of keys and values one decode step reads when attending over `slots` positions."""
    return 2 * config.n_layers * batch * config.n_kv_heads * config.head_dim * slots * element_size


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                platform=platform.platform(), date=datetime.datetime.now().isoformat(timespec="seconds"))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def prompts_for(batch: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randint(0, vocab_size, (batch, length), generator=g).tolist()


def bench(s: Settings, log=print) -> dict:
    """Measure, and return everything as a JSON-able dict (see `report.py` for the table and the plot)."""
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    if s.quantize is not None and s.quantize not in ("int8", "int4"):
        raise ValueError(f"unknown --quantize {s.quantize!r}: use int8 or int4")
    if s.quantize_head and s.quantize is None:
        raise ValueError("--quantize-head needs --quantize int8 or int4")
    if s.prompt_len < 1 or s.new_tokens < 2:
        raise ValueError("--prompt-len must be >= 1 and --new-tokens >= 2 (decode speed is measured after the "
                         "first new token)")
    device = torch.device(s.device)
    result = dict(settings=asdict(s), machine=machine(device), load_average_before=os.getloadavg())
    model, name, folder = build(s)
    config = model.config
    if s.prompt_len + s.new_tokens > config.max_seq_len:
        raise ValueError(f"--prompt-len {s.prompt_len} + --new-tokens {s.new_tokens} exceed the model's context of "
                         f"{config.max_seq_len} positions")
    dtype = next(model.parameters()).dtype  # of the activations and the KV cache
    n_params = sum(p.numel() for p in model.parameters())
    if s.quantize is not None:
        from modelcode.quantization import quantize

        quantize(model, s.quantize, s.group_size, head=s.quantize_head)
    element_size = dtype.itemsize
    w_bytes = weight_bytes(model)
    result["model"] = dict(name=name, parameters=n_params, weight_bytes_per_step=w_bytes, dtype=str(dtype),
                           quantize=s.quantize, quantize_head=s.quantize_head)
    slots = s.prompt_len + s.new_tokens  # the compiled cache attends over all its slots; eager ones grow
    runner = CompiledModel(model, slots, s.freeze, s.autotune, s.steps_per_call) if s.compile else model
    # Quantizing, or compiling on CPU (bfloat16 layers repacked in place), changed our layers: transformers then
    # gets a fresh copy of the same weights.
    changed = s.quantize is not None or getattr(runner, "packed_layers", 0) > 0
    avg_slots = slots if s.compile else s.prompt_len + s.new_tokens / 2

    rows = []
    for batch in s.batch_sizes:
        prompts = prompts_for(batch, s.prompt_len, config.vocab_size, s.seed)
        reset_peak_memory(device)
        start = time.perf_counter()
        for _ in range(s.warmup):
            run_ours(runner, prompts, s.new_tokens)  # with --compile the first one compiles
        first_run_s = time.perf_counter() - start
        runs = [run_ours(runner, prompts, s.new_tokens) for _ in range(s.repeats)]
        ours = median_run(runs)
        step_bytes = w_bytes + kv_bytes(config, batch, avg_slots, element_size)
        ours.update(weight_bytes_per_token=w_bytes / batch, gbps=step_bytes * ours["decode_tok_s"] / batch / 1e9,
                    peak_memory_gb=peak_memory(device), warmup_s=first_run_s)
        rows.append(dict(batch=batch, ours=ours, tokens=runs[-1].tokens))
        log(f"batch {batch:>3}: ours {ours['decode_tok_s']:8.1f} tok/s decode, {ours['prefill_tok_s']:8.1f} tok/s "
            f"prefill, {ours['gbps']:5.1f} GB/s")

    if s.hf:
        hf = hf_twin(build(s)[0] if changed else model, folder)
        for row in rows:
            batch = row["batch"]
            prompts = prompts_for(batch, s.prompt_len, config.vocab_size, s.seed)
            reset_peak_memory(device)
            for _ in range(s.warmup):
                run_hf(hf, prompts, s.new_tokens)
            runs = [run_hf(hf, prompts, s.new_tokens) for _ in range(s.repeats)]
            theirs = median_run(runs)
            hf_bytes = weight_bytes(hf) + kv_bytes(config, batch, s.prompt_len + s.new_tokens / 2,
                                                   next(hf.parameters()).element_size())
            theirs.update(gbps=hf_bytes * theirs["decode_tok_s"] / batch / 1e9,
                          peak_memory_gb=peak_memory(device) if device.type == "cuda" else None)
            row["transformers"] = theirs
            row["decode_speedup"] = row["ours"]["decode_tok_s"] / theirs["decode_tok_s"]
            row["prefill_speedup"] = row["ours"]["prefill_tok_s"] / theirs["prefill_tok_s"]
            row["same_tokens"] = runs[-1].tokens == row["tokens"]
            log(f"batch {batch:>3}: transformers {theirs['decode_tok_s']:8.1f} tok/s decode: ours x"
                f"{row['decode_speedup']:.2f}")
    # Last, so that its large tensor is not in the peak memory of the runs.
    log(f"measuring the memory bandwidth of {device} ...")
    result["roofline_gbps"] = roofline = read_bandwidth(device)
    for row in rows:
        del row["tokens"]
        for impl in ("ours", "transformers"):
            if impl in row:
                row[impl]["roofline_pct"] = 100 * row[impl]["gbps"] / roofline
    result["results"] = rows
    result["load_average_after"] = os.getloadavg()
    return result
