"""Timing one generation, ours and transformers', and the machine's memory bandwidth.

Decoding one token reads every weight once, whatever the batch size, so at small batches its speed is
set by memory bandwidth: tokens/s x bytes read per step is the achieved bandwidth, and the ceiling
("roofline") is what a plain streaming read of a large tensor reaches on the same device and threads.
"""

import resource
import statistics
import time
from dataclasses import dataclass

import torch

from modelcode.generation import SamplingParams, decode, prefill
from modelcode.kernels.pages import huge_page_bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Roofline:
    """The device's streaming-read bandwidth: GB/s of a sum over a `gib` GiB float32 tensor, far larger than
    any cache, done by PyTorch's own vectorized reduction on all its threads. A benchmark reads it again
    before every timed run: on a machine shared with others, what memory delivers can change by half from
    one minute to the next on a 2-core VM, so each run is set against its own moment. On CPU the tensor lies
    on huge pages, as a compiled model's weights do (`kernels/pages.py`), which streams faster than 4 KB pages."""

    def __init__(self, device: torch.device, gib: float = 1.0):
        self.device = device
        n = int(gib * 2**30) // 4
        region = huge_page_bytes(4 * n) if device.type == "cpu" else None
        self.x = (torch.empty(n, dtype=torch.float32, device=device) if region is None
                  else region.view(torch.float32)).fill_(1)
        self.x.sum()  # warm-up: page faults, thread pool
        self.readings: list[float] = []

    def read(self, repeats: int = 3) -> float:
        """GB/s of the best of `repeats` sums, also kept in `readings`."""
        best = float("inf")
        for _ in range(repeats):
            sync(self.device)
            start = time.perf_counter()
            self.x.sum()
            sync(self.device)
            best = min(best, time.perf_counter() - start)
        self.readings.append(self.x.numel() * self.x.element_size() / best / 1e9)
        return self.readings[-1]


def read_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """One reading of the `Roofline` of `device`."""
    return Roofline(device, gib).read(repeats)


def peak_memory(device: torch.device) -> float:
    """GB: peak allocated by PyTorch on a GPU (since the last reset), peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class Run:
    """One generation: the prompts' prefill (up to and including the first new token), then the decode steps."""

    batch: int
    prompt_len: int
    new_tokens: int
    first_token_s: float  # prefill + sampling the first token: time to first token
    decode_s: float  # the remaining new_tokens - 1 steps, each one forward pass
    tokens: list[list[int]]

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_len / self.first_token_s

    @property
    def decode_tok_s(self) -> float:
        """New tokens per second, all sequences of the batch together."""
        return self.batch * (self.new_tokens - 1) / self.decode_s


def run_ours(runner, prompts: list[list[int]], new_tokens: int) -> Run:
    """Greedy generation of exactly `new_tokens` per prompt (no stop ids), timed by phase."""
    device = next(runner.parameters()).device
    lengths = [len(p) for p in prompts]
    sync(device)
    start = time.perf_counter()
    cache = runner.new_cache(len(prompts))
    logits, _ = prefill(runner, cache, prompts)
    steps = decode(runner, cache, logits, lengths, [new_tokens] * len(prompts), SamplingParams())
    tokens = [next(steps).tokens]  # sampled from the prefill's logits; reading it syncs
    first = time.perf_counter()
    tokens += [s.tokens for s in steps]
    end = time.perf_counter()
    return Run(len(prompts), len(prompts[0]), new_tokens, first - start, end - first, [list(t) for t in zip(*tokens)])


def gpu_seconds(fn) -> float:
    """Seconds the GPU spent running kernels and copies while `fn` ran (torch.profiler's CUDA activity)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # The GPU's own events only: a host-side launch event also carries the time of the kernel it launched.
    return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6


def gpu_ms_per_step(gpu_seconds_of_run, new_tokens: int) -> float:
    """GPU time per decode step: `gpu_seconds_of_run(n)` for a run of `new_tokens` new tokens, less that of a
    run of half as many, over the steps between (the prefill and first token, alike in both, cancel out).
    Beside the wall time per step, what the GPU waited for the host shows as the difference."""
    short = max(1, new_tokens // 2)
    return 1e3 * (gpu_seconds_of_run(new_tokens) - gpu_seconds_of_run(short)) / (new_tokens - short)


class FirstTokenClock:
    """A transformers streamer that only notes when the first new token arrives: `generate` hands it the
    prompt, then each new token as soon as it is sampled."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, ids) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_hf(hf, prompts: list[list[int]], new_tokens: int) -> Run:
    """transformers' `generate`, greedy, exactly `new_tokens` per prompt, timed by phase like `run_ours`."""
    device = hf.device
    ids = torch.tensor(prompts, device=device)
    clock = FirstTokenClock()
    sync(device)
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0, streamer=clock)
    sync(device)
    end = time.perf_counter()
    return Run(len(prompts), len(prompts[0]), new_tokens, clock.first - start, end - clock.first,
               out[:, ids.shape[1]:].tolist())


def median_run(runs: list[Run]) -> dict:
    """Medians of the repeats' figures."""
    return dict(ttft_ms=statistics.median(r.first_token_s for r in runs) * 1e3,
                prefill_tok_s=statistics.median(r.prefill_tok_s for r in runs),
                decode_tok_s=statistics.median(r.decode_tok_s for r in runs))
