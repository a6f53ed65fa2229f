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
    "check": "modelcode.cli.check",
    "list": "modelcode.cli.list_models",
}


def main(argv: list[str] | None = None) -> None:
    from modelcode.cli.args import fail, run_command

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        from modelcode.parallel.ranks import quiet_other_ranks

        quiet_other_ranks()  # under torchrun (--tp), only rank 0 prints
        return run_command(importlib.import_module(COMMANDS[argv[0]]).main, argv[1:], prog=f"modelcode {argv[0]}")
    if argv in (["--version"], ["-V"]):
        import modelcode

        return print(f"modelcode {modelcode.__version__}")
    if argv in ([], ["--help"], ["-h"]):
        lines = [f"  {name:<12}{(importlib.import_module(m).main.__doc__ or '').strip().splitlines()[0]}"
                 for name, m in COMMANDS.items()]
        return print("usage: modelcode <command> [--help] | modelcode --version\n\ncommands:\n" + "\n".join(lines))
    fail("modelcode", f"unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)} (modelcode --help says what "
         "each does)")


if __name__ == "__main__":
    main()
