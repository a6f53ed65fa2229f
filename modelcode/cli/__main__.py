"""`modelcode <command>`: each command is one typed `main(...)` function; its signature holds the
defaults and its `Args:` docstring becomes `--help` (see `args.py`)."""

import importlib
import sys

# command -> module whose `main` implements it; imported only when that command runs.
COMMANDS = {
    "generate": "modelcode.cli.generate",
    "chat": "modelcode.cli.chat",
    "info": "modelcode.cli.info",
    "quantize": "modelcode.cli.quantize",
    "classify": "modelcode.cli.classify",
    "translate": "modelcode.cli.translate",
    "embed": "modelcode.cli.embed",
    "similarity": "modelcode.cli.similarity",
    "show": "modelcode.cli.show",
    "bench": "modelcode.cli.bench",
    "serve": "modelcode.cli.serve",
    "finetune": "modelcode.cli.finetune",
}


def main(argv: list[str] | None = None) -> None:
    from modelcode.cli.args import run

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        fn = importlib.import_module(COMMANDS[argv[0]]).main
        try:
            run(fn, argv[1:], prog=f"modelcode {argv[0]}")
        except (ValueError, FileNotFoundError, KeyError) as e:  # bad input: the message says what to do
            sys.exit(f"modelcode {argv[0]}: error: {e}")
        except BrokenPipeError:  # output piped into `head` and the like
            sys.stderr.close()
        return
    lines = [f"  {name:<12}{(importlib.import_module(m).main.__doc__ or '').strip().splitlines()[0]}"
             for name, m in COMMANDS.items()]
    print("usage: modelcode <command> [--help]\n\ncommands:\n" + "\n".join(lines))
    sys.exit(0 if argv in ([], ["--help"], ["-h"]) else 2)


if __name__ == "__main__":
    main()
