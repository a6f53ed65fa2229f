"""`modelcode generate`: complete prompts, streaming the text as it comes."""

import sys
import time
from collections.abc import Callable

DEFAULT_PROMPT = "Once upon a time"


def main(prompt: list[str] = (), *, model: str | None = None, max_new_tokens: int | None = None,
         temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
         seed: int | None = None, stop: list[str] | None = None, dtype: str | None = None,
         device: str = "cpu", draft: str | None = None, prompt_lookup: int | None = None,
         speculate_k: int = 4, compile: bool = False, tp: int | None = None) -> None:
    """Generate text from one or more prompts; speed goes to stderr.

    Args:
        prompt: the prompt(s); several are generated together as one batch (default: "Once upon a time").
        model: checkpoint folder, or an embedded model's name (default: the embedded TinyStories-656K).
        max_new_tokens: tokens to generate at most per prompt (default: the checkpoint's, else 256).
        temperature: 0 is greedy (default: the checkpoint's generation_config, else greedy).
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probability mass reaches p.
        seed: random seed, for reproducible sampling.
        stop: strings that end the generation (the string itself is not printed).
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own).
        device: cpu, cuda, cuda:1, ...
        draft: speculative decoding with this smaller draft model (same tokenizer): checkpoint folder or name.
        prompt_lookup: speculative decoding that drafts by finding the last N tokens (N down to 1) earlier in
            the text and proposing what followed them there.
        speculate_k: draft tokens the model checks per forward pass, with --draft or --prompt-lookup.
        compile: decode with a static KV cache and compiled decode steps (torch.compile; CUDA graphs on GPU).
            Compiling takes a while (a minute or more on CPU), done and timed first; it pays off on long outputs.
            A small model's steps are kept per machine: without --compile, a run that finds none decodes eagerly
            and then compiles them in the background for the next (MODELCODE_BACKGROUND_BUILD=0: never).
        tp: tensor parallelism: split the model across this many processes, started by torchrun
            (torchrun --standalone --nproc-per-node N --no-python modelcode generate ... --tp N); rank 0 prints.
    """
    import modelcode

    lm = modelcode.load(model, dtype=dtype, device=device, task="causal-lm", tp=tp)
    if compile and (draft is not None or prompt_lookup is not None):
        raise ValueError("--compile applies to plain decoding, not to --draft / --prompt-lookup: use one of them")
    prompts = list(prompt) or [DEFAULT_PROMPT]
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    stop=stop)
    if compile:
        compile_for(lm, lambda: lm.text_completion(prompts, **{**settings, "max_new_tokens": 2}))
    elif draft is None and prompt_lookup is None and tp is None and lm.compile_if_saved():
        # a small model's steps, compiled by an earlier --compile on this machine: loaded (a second) before timing
        lm.text_completion(prompts, **{**settings, "max_new_tokens": 2})
    if draft is not None or prompt_lookup is not None:
        draft_lm = None if draft is None else modelcode.load(draft, dtype=dtype, device=device, task="causal-lm")
        return speculate(lm, prompts, draft_lm, prompt_lookup, speculate_k, settings)
    start = time.perf_counter()
    if len(prompts) == 1:
        stream = lm.stream(prompts[0], **settings)
        sys.stdout.write(prompts[0])
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        n_tokens = len(stream.tokens)
    else:
        results = lm.text_completion(prompts, **settings)
        for p, r in zip(prompts, results):
            print(f"{p}{r['generation']}\n")
        n_tokens = sum(len(r["tokens"]) for r in results)
    report_speed(n_tokens, time.perf_counter() - start)
    if not compile and tp is None:
        options = given(model=model, dtype=dtype, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        build_steps_later(lm, ["generate", *options, "--max-new-tokens", "2", "--", *prompts])


def compile_for(lm, warm_up: Callable[[], object]) -> None:
    """Compile the decode step, saying so, with `warm_up`: a short run of the batch size and sampling settings
    to come (each pair compiles a graph of its own), so that what runs afterwards, and its speed, is the
    compiled model's alone."""
    print("[--compile: compiling the decode step (a minute or more on CPU; a small model's once per machine) ...",
          end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    lm.compile()
    warm_up()
    print(f" done in {time.perf_counter() - start:.0f} s; it pays off on long outputs]", file=sys.stderr)


def build_steps_later(lm, command: list[str]) -> None:
    """After a small CPU model decoded eagerly for want of compiled steps saved on this machine: `command`
    (`modelcode` arguments that run the same batch size and sampling) with --compile, in the background
    (`generation/aot.py`), so that the next such run loads the steps instead."""
    from modelcode.generation import aot

    if not (aot.background_builds() and lm.wants_saved_steps()):
        return
    if aot.build_in_background(lm.fingerprint(), [command[0], "--compile", *command[1:]]):
        print("[compiling this model's decode steps for this machine in the background (about a minute, once); "
              "the next run loads them. MODELCODE_BACKGROUND_BUILD=0 turns this off]", file=sys.stderr)


def given(**options) -> list[str]:
    """`--name value` for each option that is not None."""
    from modelcode.cli.args import flag

    return [word for name, value in options.items() if value is not None for word in (flag(name), str(value))]


def report_speed(n_tokens: int, seconds: float) -> None:
    print(f"[{n_tokens} tokens in {seconds:.2f} s: {n_tokens / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)


def speculate(lm, prompts: list[str], draft, prompt_lookup: int | None, speculate_k: int, settings: dict) -> None:
    """One prompt with speculative decoding; the acceptance rate goes to stderr with the speed."""
    if len(prompts) != 1:
        raise ValueError(f"speculative decoding runs one prompt at a time, got {len(prompts)}: pass a single prompt")
    tok = lm._tokenizer()
    ids = tok.encode(prompts[0], bos=tok.add_bos)
    start = time.perf_counter()
    out = lm.speculative_generate(ids, draft, prompt_lookup, speculate_k, **settings)
    seconds = time.perf_counter() - start
    print(prompts[0] + lm._completion(ids, out.tokens, None, settings["stop"])["generation"])
    n_tokens = len(out.tokens)
    report_speed(n_tokens, seconds)
    print(f"[{out.stats.summary(n_tokens)}]", file=sys.stderr)
