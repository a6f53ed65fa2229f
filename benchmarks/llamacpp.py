"""modelcode beside llama.cpp on the same weights: decode tokens/s at batch 1, greedy, interleaved in one run.

The model (the embedded TinyStories-656K, or random weights of a preset shape) is written once as a GGUF
file (`gguf`, the writer llama.cpp's own converter uses): the same tensors, q and k reordered to the
interleaved rotary pairs llama.cpp rotates, in float32, bfloat16, q8_0 or q4_0 (beside modelcode's float,
int8 and int4). Its vocabulary is a placeholder: both sides are fed token ids and choose token ids.
llama.cpp runs through its Python bindings' C API (`llama-cpp-python`, built for this machine), modelcode
through `generate`: eager, compiled in the process (torch.compile), or, for a small model, saved: its steps
compiled ahead of time once per machine and loaded (`generation/aot.py`; what `modelcode generate` runs once a
`--compile` has saved them, and `--compile` itself from then on; without them it runs eager). Each round runs every
subject once, each prefilling the same prompt then decoding `--new-tokens` greedily, stop ids ignored; the
ratios are medians of the rounds' own ratios, so a machine whose speed drifts moves both sides alike.

    python benchmarks/llamacpp.py [--model tinystories-656k] [--modes eager compiled saved] [--repeats 3]
    python benchmarks/llamacpp.py --model llama-1b --quantize int8 --modes compiled   # against q8_0

`--no-extra-bufts` loads llama.cpp without its repacked weight buffers (`use_extra_bufts`), for machines
where that path (AMX) faults. Results: `benchmarks/results/llamacpp-<model>-<weights>.json`.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modelcode.api import EMBEDDED
from modelcode.bench.measure import run_ours
from modelcode.bench.run import machine
from modelcode.bench.subjects import random_model
from modelcode.generation import generate
from modelcode.generation.compile import CompiledModel
from modelcode.loading import load_model
from modelcode.loading.weight_maps.llama import hf_to_meta_rope
from modelcode.quantization.host import prepare_decoding

RESULTS = Path(__file__).parent / "results"
# llama.cpp's type for modelcode's weights of each kind: float32 / bfloat16 as they are, int8 -> q8_0, int4 -> q4_0.
GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
NAMES = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
         "attention.wo": "attn_output", "ffn_norm": "ffn_norm", "feed_forward.w1": "ffn_gate",
         "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"}


def gguf_name(ours: str) -> str:
    if ours.startswith("layers."):
        _, i, rest = ours.split(".", 2)
        module, _, kind = rest.rpartition(".")
        return f"blk.{i}.{NAMES[module]}.{kind}"
    return {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "output.weight": "output.weight"}[ours]


def write_gguf(model: torch.nn.Module, weights: str, path: Path) -> None:
    """The model's tensors as a llama.cpp GGUF file: matrices in `weights`' type, norms in float32. The output
    head stays q8_0 under q4_0 layers, as modelcode's int4 keeps its head in int8."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_tokenizer_model("llama")  # a placeholder vocabulary: 256 byte tokens, then plain ones
    w.add_token_list([f"<0x{i:02X}>" for i in range(256)] + [f"t{i}" for i in range(256, c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (c.vocab_size - 256))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in model.state_dict().items():
        if name == "output.weight" and c.tie_word_embeddings:
            continue
        t = t.float()
        if name.endswith("attention.wq.weight"):
            t = hf_to_meta_rope(t, c.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = hf_to_meta_rope(t, c.n_kv_heads)
        kind = GGUF_TYPES[weights] if t.dim() == 2 else "F32"
        if name == "output.weight" and kind == "Q4_0":
            kind = "Q8_0"
        qtype = gguf.GGMLQuantizationType[kind]
        data = t.numpy() if kind == "F32" else gguf.quants.quantize(t.numpy(), qtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=None if kind == "F32" else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class LlamaCpp:
    """One llama.cpp model and context, fed token ids through the C API (no sampler, no detokenizer)."""

    def __init__(self, path: Path, n_ctx: int, threads: int, extra_bufts: bool):
        import llama_cpp as lc

        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept alive: llama.cpp calls it
        lc.llama_log_set(self._quiet, None)
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.use_extra_bufts = extra_bufts
        self.model = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_ctx, n_ctx
        cp.n_threads, cp.n_threads_batch = threads, threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_ctx, 0, 1)

    def _decode(self, tokens: list[int], start: int) -> int:
        b = self.batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, start + i, 1, i == len(tokens) - 1
            b.seq_id[i][0] = 0
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
        """Greedy tokens after the prompt, and decode tokens/s (prefill excluded)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        out = [self._decode(prompt, 0)]
        start = time.perf_counter()
        while len(out) < new_tokens:
            out.append(self._decode(out[-1:], len(prompt) + len(out) - 1))
        return out, (new_tokens - 1) / (time.perf_counter() - start)


def ours(runner, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens from modelcode's decoding and its decode tokens/s, timed from the first new token (the
    prefill's) to the last, as `modelcode bench` times it."""
    run = run_ours(runner, [prompt], new_tokens)
    return run.tokens[0], (new_tokens - 1) / run.decode_s


def subject(args) -> tuple[torch.nn.Module, str]:
    """Our model, and the kind of weights llama.cpp gets for it."""
    if args.model in EMBEDDED:
        model = load_model(EMBEDDED[args.model], dtype=args.dtype or "float32")[0]
    else:
        model = random_model(args.model, getattr(torch, args.dtype or "bfloat16"), torch.device("cpu"))
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    return model, args.quantize or weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tinystories-656k", help="tinystories-656k, or a preset such as llama-1b")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the model's own (random: bfloat16)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="ours int8/int4 (head int8) against q8_0/q4_0")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled", "saved"], choices=["eager", "compiled", "saved"],
                   help="compiled: in this process (torch.compile); saved: a small model's steps compiled ahead of "
                        "time once per machine, loaded (what `generate` runs after one --compile)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for both sides")
    p.add_argument("--no-extra-bufts", action="store_true", help="llama.cpp without repacked weight buffers")
    p.add_argument("--out", type=Path, help="results file (default: results/llamacpp-<model>-<weights>.json)")
    p.add_argument("--gguf-dir", type=Path, default=Path("bench-out"), help="where the GGUF files are kept")
    args = p.parse_args()
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        sys.exit(f"skipped: llama.cpp's side needs `pip install llama-cpp-python gguf` ({e.name} is missing); "
                 "llama-cpp-python builds llama.cpp for this machine, which takes a while")
    torch.set_num_threads(args.threads)
    model, weights = subject(args)
    path = args.gguf_dir / f"{args.model}-{weights}.gguf"
    if not path.exists():
        args.gguf_dir.mkdir(parents=True, exist_ok=True)
        write_gguf(model, weights, path)
    if args.quantize:
        from modelcode.quantization import quantize

        quantize(model, args.quantize, 32)
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    prompt = [1, *prompt.tolist()[1:]]
    n_ctx = args.prompt_len + args.new_tokens + 8
    subjects = {"llama.cpp": LlamaCpp(path, n_ctx, args.threads, not args.no_extra_bufts).generate}
    if set(args.modes) - {"eager"}:
        prepare_decoding(model)
    if "saved" in args.modes:  # compiled into the store unless an earlier run did; the subject below loads it
        generate(CompiledModel(model, n_ctx, saved=True), [prompt], 2)
    for mode in args.modes:
        runner = model
        if mode != "eager":
            runner = CompiledModel(model, n_ctx, saved=mode == "saved", build=mode != "saved")
        subjects[f"modelcode {mode}"] = lambda prompt, n, runner=runner: ours(runner, prompt, n)
    tokens, speeds = {}, {name: [] for name in subjects}
    for name, run in subjects.items():  # warm-up (compiling, or loading saved steps), then interleaved rounds
        start = time.perf_counter()
        tokens[name] = run(prompt, args.new_tokens)[0]
        print(f"{name}: warm-up {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(args.repeats):
        for name, run in subjects.items():
            speeds[name].append(run(prompt, args.new_tokens)[1])
    report(args, weights, subjects, tokens, speeds)


def report(args, weights: str, subjects: dict, tokens: dict, speeds: dict) -> None:
    base = speeds["llama.cpp"]
    rows = {}
    for name in subjects:
        ratio = statistics.median(s / b for s, b in zip(speeds[name], base))
        same = sum(a == b for a, b in zip(tokens[name], tokens["llama.cpp"]))
        rows[name] = dict(decode_tok_s=statistics.median(speeds[name]), rounds=speeds[name], vs_llama_cpp=ratio,
                          same_tokens_as_llama_cpp=f"{same}/{args.new_tokens}")
        print(f"{name:>20}: {rows[name]['decode_tok_s']:8.1f} tok/s  {ratio:5.2f}x llama.cpp  "
              f"(rounds {', '.join(f'{s:.1f}' for s in speeds[name])}; same tokens {same}/{args.new_tokens})")
    out = args.out or RESULTS / f"llamacpp-{args.model}-{weights}.json"
    settings = {k: str(v) for k, v in vars(args).items()}
    result = dict(settings=settings, machine=machine(torch.device("cpu")), weights=weights, results=rows)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
