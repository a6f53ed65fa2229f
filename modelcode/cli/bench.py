"""`modelcode bench`: generation speed and memory, ours beside transformers' `generate` on the same weights."""

import json
import sys
from pathlib import Path
from typing import Literal


def main(*, model: str | None = None, dtype: str | None = None, device: str = "cpu", compile: bool = False,
         freeze: bool = True, autotune: bool = True, steps_per_call: int | None = None,
         quantize: Literal["int8", "int4"] | None = None, group_size: int = 32, quantize_head: bool | None = None,
         batch_sizes: list[int] = (1, 2, 4, 8, 16), prompt_len: int = 128,
         new_tokens: int = 64, repeats: int = 3, warmup: int = 1, hf: bool = True, threads: int | None = None,
         draft: str | None = None, prompt_lookup: int | None = None, speculate_k: int = 4,
         out: str = "bench.json", plot: str | None = None, tp: int | None = None) -> None:
    """Measure prefill and decode speed, time to first token, memory and bandwidth for each batch size.

    Decoding reads all the weights once per step, so the table also gives the bandwidth that achieves and
    its share of the machine's roofline, measured first with a large streaming read on the same device.

    Args:
        model: checkpoint folder, embedded model's name, or a preset shape with random weights (e.g. llama-1b,
            llama-3-8b: built on the meta device, nothing to download) (default: the embedded TinyStories-656K).
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own; bfloat16 for a preset).
        device: cpu, cuda, ...
        compile: decode with a static KV cache and compiled decode steps (compile time is reported as warmup_s).
        freeze: with --compile on CPU, compile the weights in as constants: faster, but a second copy of the
            weights in memory (--no-freeze: the compiled step reads the model's own weights).
        autotune: with --compile and --freeze, let inductor time its own matmul kernels against the library's
            and keep the faster (--no-autotune compiles in a fraction of the time).
        steps_per_call: with --compile, decode steps per compiled call (default: 8 for models of at most
            64 MiB of weights, else 1).
        quantize: int8 or int4 weight-only quantization of our model (transformers runs the unquantized weights).
        group_size: int4 only: inputs per scale and zero.
        quantize_head: with --quantize, an output head not tied to the embeddings: by default in int8 (both
            modes, as `modelcode quantize`); --quantize-head: in the layers' mode; --no-quantize-head: kept.
        batch_sizes: the batch sizes to measure.
        prompt_len: tokens per prompt (random ids).
        new_tokens: tokens generated per prompt (no stop token ends them early).
        repeats: timed runs per configuration; the table shows their median.
        warmup: untimed runs first, per batch size.
        hf: also run transformers' generate on the same weights (--no-hf to skip).
        threads: CPU threads for PyTorch (default: PyTorch's own choice).
        draft: also time speculative decoding with this draft model (checkpoint folder or embedded name, same
            tokenizer) beside plain decoding, eager, at batch 1: tokens/s, acceptance rate, speed-up.
        prompt_lookup: the same with prompt lookup (drafts from n-grams of up to N tokens found in the context).
        speculate_k: with --draft or --prompt-lookup, draft tokens per target pass.
        out: the JSON file of all results.
        plot: a PNG of tokens/s against batch size (default: the JSON's path with .png).
        tp: tensor parallelism across this many processes started by torchrun (torchrun --standalone
            --nproc-per-node N --no-python modelcode bench ... --tp N --no-hf); rank 0 prints and writes the files.
    """
    from modelcode.bench.report import plot as draw
    from modelcode.bench.report import table
    from modelcode.bench.run import Settings, bench
    from modelcode.parallel.ranks import is_first_rank

    settings = Settings(model, dtype, device, compile, freeze, autotune, steps_per_call, quantize, group_size,
                        quantize_head, tuple(batch_sizes), prompt_len, new_tokens, repeats, warmup, hf, threads,
                        draft=draft, prompt_lookup=prompt_lookup, speculate_k=speculate_k, tp=tp)
    result = bench(settings, log=lambda line: print(line, file=sys.stderr))
    print(table(result))
    if not is_first_rank():
        return
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    picture = draw(result, plot or out_path.with_suffix(".png"))
    print(f"wrote {out_path} and {picture}", file=sys.stderr)
