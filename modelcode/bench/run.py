"""One benchmark: a model, a set of batch sizes, ours and transformers' `generate` on the same weights."""

import datetime
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from modelcode.api import EMBEDDED, resolve_path
from modelcode.bench.measure import (
    Roofline,
    gpu_ms_per_step,
    gpu_seconds,
    median_run,
    peak_memory,
    reset_peak_memory,
    run_hf,
    run_ours,
)
from modelcode.bench.speculation import bench_speculation
from modelcode.bench.subjects import hf_twin, random_model, weight_bytes
from modelcode.generation.compile import CompiledModel
from modelcode.kernels import Installed, PackedBF16Linear
from modelcode.kernels.cpu import amx_available, cpu_flags, cpuinfo, loaded_build, loaded_prefetch
from modelcode.loading import load_model, registry, resolve_dtype
from modelcode.loading.loader import resolve_device
from modelcode.quantization import Int4Linear, Int8Linear, PackedInt4Linear, PackedInt8Linear
from modelcode.quantization.host import prepare_decoding
from modelcode.quantization.linear import triton_ready

MATMUL_FLAGS = {"avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16",
                "amx_int8", "avx_vnni"}


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
    quantize_head: bool | None = None  # an untied output head: None int8, True the layers' mode, False kept
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    prompt_len: int = 128
    new_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    hf: bool = True
    threads: int | None = None
    seed: int = 0
    draft: str | None = None  # speculative decoding beside plain decoding at batch 1: a draft model's folder or name
    prompt_lookup: int | None = None  # ... or prompt lookup of n-grams up to this long
    speculate_k: int = 4  # draft tokens per target pass
    tp: int | None = None  # tensor parallelism across this many torchrun processes (see modelcode/parallel/)


def build(s: Settings) -> tuple[torch.nn.Module, str, Path | None]:
    """A fresh, unquantized model for the settings: (model, its name, its folder if it has one)."""
    device, shard = torch.device(s.device), None
    if s.tp is not None:
        from modelcode.parallel.process import start

        shard, device = start(s.tp, device)
    name = s.model or "tinystories-656k"
    folder = resolve_path(name)
    if folder.is_dir():
        model, _, _ = load_model(folder, dtype=s.dtype, device=device, shard=shard)
        return model, folder.name, folder
    if name in registry.PRESETS:
        model = random_model(name, resolve_dtype(s.dtype, "bfloat16"), device, s.seed)
        if shard is not None:  # every rank draws the same weights, then keeps its share
            shard.shard(model, model.config)
            shard.connect(model)
        return model, f"{name} (random)", None
    raise ValueError(f"no model {name!r}: give a checkpoint folder, an embedded model ({', '.join(EMBEDDED)}) "
                     f"or a preset for random weights ({', '.join(sorted(registry.PRESETS))})")


def kv_bytes(config, batch: int, slots: float, element_size: int) -> float:
    """Bytes of keys and values one decode step reads when attending over `slots` positions."""
    return 2 * config.n_layers * batch * config.n_kv_heads * config.head_dim * slots * element_size


def machine(device: torch.device) -> dict:
    cpu = cpuinfo("model name") or platform.processor()
    flags = sorted(cpu_flags() & MATMUL_FLAGS)  # what decides which kernels can run
    # The model name alone does not tell CPU generations apart (every Zen is "AMD EPYC" in a VM): family/model does.
    family = "/".join(filter(None, (cpuinfo("cpu family"), cpuinfo("model"))))
    info = dict(cpu=cpu, cpu_family_model=family, cpu_vendor=cpuinfo("vendor_id"), cpu_flags=flags,
                cpu_kernels=getattr(loaded_build(), "label", None),
                cpu_kernel_prefetch=loaded_prefetch(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                platform=platform.platform(), date=datetime.datetime.now().isoformat(timespec="seconds"))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def layer_kernels(model: torch.nn.Module) -> dict[str, str]:
    """Which matmul each Linear-like layer of the model runs, by its name (layers fused into one matmul are named
    by their members)."""
    isa = getattr(loaded_build(), "label", "")
    amx = ", AMX from 5 rows" if amx_available() else ""
    # prompts of int8 and int4 layers: their weights dequantized 64 outputs at a time for modelcode's bf16 kernel
    # (AVX-512), or whole for PyTorch's matmul (AVX2)
    prompt = f" for modelcode bf16{amx}" if isa == "AVX-512" else ", PyTorch matmul"
    kinds = {torch.nn.Linear: "PyTorch matmul", PackedBF16Linear: f"modelcode bf16 ({isa}{amx})",
             Int8Linear: "PyTorch _weight_int8pack_mm (1-16 rows)", Int4Linear: "dequantized, PyTorch matmul",
             PackedInt8Linear: f"modelcode int8 ({isa}, 1-16 rows; more: dequantized{prompt})"}
    int4 = {"modelcode-cpu": f"modelcode int4 ({isa}, 1-16 rows; more: dequantized{prompt})",
            "cpu": "PyTorch int4 (CPU)", "cuda": "PyTorch int4 (tinygemm)",
            "triton": "modelcode int4, Triton (1-16 rows)"}
    out = {}
    for name, m in model.named_modules():
        if name.endswith(".fused"):
            continue
        if isinstance(m, PackedInt4Linear):
            out[name] = int4[m.kernel]
        elif isinstance(m, Int8Linear) and m.weight.is_cuda:
            out[name] = "modelcode int8, Triton (1-16 rows)" if triton_ready() else "dequantized, PyTorch matmul"
        elif type(m) in kinds:
            out[name] = kinds[type(m)]
    return out


def warm_up(subjects: dict, rows: dict, s: Settings, config, device: torch.device, log) -> None:
    """The untimed first runs of every batch size, in order (with --compile the first one compiles), and the
    memory peak after them: on CPU the process's peak so far, so batch sizes go from small to large."""
    for batch, row in rows.items():
        prompts = prompts_for(batch, s.prompt_len, config.vocab_size, s.seed)
        for impl, (runner, run) in subjects.items():
            reset_peak_memory(device)
            start = time.perf_counter()
            for _ in range(s.warmup):
                run(runner, prompts, s.new_tokens)
            peak = peak_memory(device) if impl == "ours" or device.type == "cuda" else None
            row[impl] = dict(warmup_s=time.perf_counter() - start, peak_memory_gb=peak)
        log(f"batch {batch:>3}: warmed up ({', '.join(subjects)})")


def timed_runs(subjects: dict, rows: dict, s: Settings, config, roofline: Roofline) -> dict:
    """`repeats` rounds, each running every batch size of every subject once, with the bandwidth read just
    before each run: side by side in time, so that a change in what the machine delivers hits them all.
    Returns {(batch, impl): [(Run, GB/s of the roofline then), ...]}."""
    timed = {(batch, impl): [] for batch in rows for impl in subjects}
    for _ in range(s.repeats):
        for batch in rows:
            prompts = prompts_for(batch, s.prompt_len, config.vocab_size, s.seed)
            for impl, (runner, run) in subjects.items():
                reading = roofline.read()
                timed[batch, impl].append((run(runner, prompts, s.new_tokens), reading))
    return timed


def summarize(out: dict, timed: list, step_bytes: float, batch: int) -> list[list[int]]:
    """Medians of one subject's timed runs at one batch size into `out`, each run's GB/s set against the
    bandwidth read just before it; returns the last run's tokens."""
    runs, readings = zip(*timed)
    achieved = [step_bytes * r.decode_tok_s / batch / 1e9 for r in runs]
    out.update(median_run(runs), gbps=statistics.median(achieved), roofline_gbps=statistics.median(readings),
               roofline_pct=statistics.median(100 * a / b for a, b in zip(achieved, readings)),
               runs=[dict(decode_tok_s=r.decode_tok_s, gbps=a, roofline_gbps=b)
                     for r, a, b in zip(runs, achieved, readings)])
    return runs[-1].tokens


def speculation(model: torch.nn.Module, s: Settings, config, log) -> dict:
    """Plain and speculative greedy decoding of the batch-1 prompt, side by side (see `speculation.py`)."""
    draft = None
    if s.draft is not None:
        draft, _, _ = load_model(resolve_path(s.draft), dtype=next(model.parameters()).dtype, device=s.device)
    prompt = prompts_for(1, s.prompt_len, config.vocab_size, s.seed)[0]
    return bench_speculation(model, prompt, s.new_tokens, draft, s.prompt_lookup, s.speculate_k, s.repeats,
                             s.warmup, log)


def gpu_seconds_of_run(runner, prompts: list[list[int]], new_tokens: int) -> float:
    return gpu_seconds(lambda: run_ours(runner, prompts, new_tokens))


def prompts_for(batch: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randint(0, vocab_size, (batch, length), generator=g).tolist()


def bench(s: Settings, log=print) -> dict:
    """Measure, and return everything as a JSON-able dict (see `report.py` for the table and the plot)."""
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    if s.quantize is not None and s.quantize not in ("int8", "int4"):
        raise ValueError(f"unknown --quantize {s.quantize!r}: use int8 or int4")
    if s.quantize_head is not None and s.quantize is None:
        raise ValueError("--quantize-head and --no-quantize-head need --quantize int8 or int4")
    if s.tp is not None and (s.hf or s.quantize or s.draft or s.prompt_lookup):
        raise ValueError("--tp measures our model alone, as loaded: add --no-hf (transformers runs the whole model "
                         "in one process), and bench a folder quantized beforehand (modelcode quantize) rather than "
                         "--quantize; speculative decoding is not measured with --tp")
    if s.draft is not None and s.prompt_lookup is not None:
        raise ValueError("give one speculative drafter: --draft MODEL or --prompt-lookup N, not both")
    if not s.batch_sizes or min(s.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must each be 1 or more, got {' '.join(map(str, s.batch_sizes))}")
    if s.repeats < 1 or s.warmup < 0:
        raise ValueError(f"--repeats must be 1 or more (got {s.repeats}) and --warmup 0 or more (got {s.warmup})")
    if s.prompt_len < 1 or s.new_tokens < 2:
        raise ValueError("--prompt-len must be >= 1 and --new-tokens >= 2 (decode speed is measured after the "
                         "first new token)")
    device = resolve_device(s.device)
    result = dict(settings=asdict(s), machine=machine(device), load_average_before=os.getloadavg())
    model, name, folder = build(s)
    config = model.config
    if s.prompt_len + s.new_tokens > config.max_seq_len:
        raise ValueError(f"--prompt-len {s.prompt_len} + --new-tokens {s.new_tokens} exceed the model's context of "
                         f"{config.max_seq_len} positions")
    dtype = next(model.parameters()).dtype  # of the activations and the KV cache
    n_params = sum(p.numel() for p in model.parameters())
    head = None
    if s.quantize is not None:
        from modelcode.quantization import quantize
        from modelcode.quantization.quantize import head_mode

        quantize(model, s.quantize, s.group_size, head=s.quantize_head)
        head = head_mode(model)  # what the head became: "int8", "int4", or None (kept, or tied)
    element_size = dtype.itemsize
    w_bytes = weight_bytes(model)
    result["model"] = dict(name=name, parameters=n_params, weight_bytes_per_step=w_bytes, dtype=str(dtype),
                           quantize=s.quantize, quantize_head=head)
    slots = s.prompt_len + s.new_tokens  # the compiled cache attends over all its slots; eager ones grow
    installed = prepare_decoding(model) if s.compile else Installed()  # what compiled decoding runs on
    runner = CompiledModel(model, slots, s.freeze, s.autotune, s.steps_per_call) if s.compile else model
    result["kernels"] = dict(installed=asdict(installed), layers=layer_kernels(model))
    log("matmuls: " + ", ".join(f"{n} x {kind}" for kind, n in Counter(result["kernels"]["layers"].values()).items()))
    # Quantizing, or installing the CPU kernels (bfloat16 layers repacked in place), changed our layers:
    # transformers then gets a fresh copy of the same weights.
    changed = s.quantize is not None or installed.packed_layers > 0
    avg_slots = slots if s.compile else s.prompt_len + s.new_tokens / 2

    subjects = {"ours": (runner, run_ours)}
    per_step = {"ours": (w_bytes, avg_slots)}  # weight bytes read, and KV-cache slots attended over on average
    rows = {batch: dict(batch=batch) for batch in s.batch_sizes}
    warm_up(subjects, rows, s, config, device, log)
    if s.hf:
        # After our warm-ups, so that our peak memory leaves out its copy of the weights.
        hf = hf_twin(build(s)[0] if changed else model, folder)
        subjects["transformers"] = (hf, run_hf)
        per_step["transformers"] = (weight_bytes(hf), s.prompt_len + s.new_tokens / 2)
        warm_up({"transformers": subjects["transformers"]}, rows, s, config, device, log)
    roofline = Roofline(device)  # after the warm-ups too, for the same reason
    timed = timed_runs(subjects, rows, s, config, roofline)
    for batch, row in rows.items():
        tokens = {impl: summarize(row[impl], timed[batch, impl], weights + kv_bytes(config, batch, attended,
                                  element_size), batch) for impl, (weights, attended) in per_step.items()}
        row["ours"]["weight_bytes_per_token"] = w_bytes / batch
        if device.type == "cuda":
            prompts = prompts_for(batch, s.prompt_len, config.vocab_size, s.seed)
            row["ours"]["gpu_ms_per_step"] = gpu_ms_per_step(partial(gpu_seconds_of_run, runner, prompts), s.new_tokens)
        if "transformers" in row:
            row["decode_speedup"] = row["ours"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
            row["prefill_speedup"] = row["ours"]["prefill_tok_s"] / row["transformers"]["prefill_tok_s"]
            row["same_tokens"] = tokens["transformers"] == tokens["ours"]
        log(f"batch {batch:>3}: ours {row['ours']['decode_tok_s']:8.1f} tok/s decode, {row['ours']['gbps']:5.1f} GB/s"
            f" = {row['ours']['roofline_pct']:.0f}% of the roofline"
            + (f"; transformers {row['transformers']['decode_tok_s']:8.1f}: ours x{row['decode_speedup']:.2f}"
               if "transformers" in row else ""))
    if s.draft is not None or s.prompt_lookup is not None:
        result["speculative"] = speculation(model, s, config, log)
    result["roofline_gbps"] = statistics.median(roofline.readings)
    result["roofline_range_gbps"] = [min(roofline.readings), max(roofline.readings)]
    result["results"] = list(rows.values())
    result["load_average_after"] = os.getloadavg()
    return result
