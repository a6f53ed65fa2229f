"""`modelcode chat`: an interactive multi-turn chat in the terminal."""

import sys
import time

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply."


def main(*, model: str | None = None, system: str | None = None, max_new_tokens: int | None = None,
         temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
         seed: int | None = None, dtype: str | None = None, device: str = "cpu", compile: bool = False,
         tp: int | None = None) -> None:
    """Chat with a model; the conversation's KV cache is kept between turns, so only the new turn is prefilled.

    Args:
        model: checkpoint folder, or an embedded model's name (default: the embedded TinyStories-656K).
        system: a system message to start the conversation with.
        max_new_tokens: tokens per reply at most (default: the checkpoint's, else 256).
        temperature: 0 is greedy (default: the checkpoint's generation_config, else greedy).
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens whose probability mass reaches p.
        seed: random seed, for reproducible sampling.
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own).
        device: cpu, cuda, cuda:1, ...
        compile: decode with a static KV cache and compiled decode steps (torch.compile; CUDA graphs on GPU).
            It compiles before the first turn (a minute or more on CPU), saying so.
        tp: tensor parallelism: split the model across this many processes, started by torchrun
            (torchrun --standalone --nproc-per-node N --no-python modelcode chat --tp N); rank 0 reads and prints.
    """
    import modelcode
    from modelcode.cli.generate import build_steps_later, compile_for, given
    from modelcode.generation.session import ChatSession

    lm = modelcode.load(model, dtype=dtype, device=device, task="causal-lm", tp=tp)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if compile:  # a two-token reply with the same sampling compiles what the turns run
        compile_for(lm, lambda: list(ChatSession(lm, system, max_new_tokens=2, **sampling).send("Hello")))
    elif tp is None and lm.compile_if_saved():  # steps an earlier --compile kept: loaded before the first turn
        list(ChatSession(lm, system, max_new_tokens=2, **sampling).send("Hello"))
    session = ChatSession(lm, system, max_new_tokens=max_new_tokens, **sampling)
    converse(session, lm)
    if not compile and tp is None:
        build_steps_later(lm, ["chat", *given(model=model, dtype=dtype, **sampling)])


def converse(session, lm) -> None:
    """Read a line, stream the reply, until /exit or end of input."""
    from modelcode.generation import ContextLengthError
    from modelcode.parallel.ranks import read_line

    print(f"Chatting with {lm.path.name} ({type(lm.chat_format).__name__}). {HELP}", file=sys.stderr)
    while True:
        line = read_line("> ")  # under torchrun, every rank gets rank 0's line
        if line is None:
            print(file=sys.stderr)
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            session.reset()
            print("[new conversation]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        start = time.perf_counter()
        try:
            for delta in session.send(line):
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            print("\n[reply stopped]", file=sys.stderr)
            continue
        except ContextLengthError as e:
            print(f"[{e}]", file=sys.stderr)
            continue
        print()
        reply = len(session.history) - len(session.prompt)
        print(f"[prefilled {session.prefilled} tokens in {session.prefill_seconds:.2f} s; replied {reply} tokens in "
              f"{time.perf_counter() - start:.2f} s]", file=sys.stderr)

