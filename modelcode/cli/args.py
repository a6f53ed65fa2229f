"""Typed functions are the CLI: build an argparse parser from a `main(...)` signature and docstring.

Python's positional parameters become positional arguments (a `list[...]` one takes any number of
words); keyword-only parameters become `--options` (spelled with dashes or underscores); a `list[...]`
option takes several words, or one word per flag, repeated, in a command with a positional list. The defaults
live only in the signature and each option's help comes from the `Args:` section of the docstring.
"""

import argparse
import inspect
import sys
import types
import typing
from collections.abc import Callable

import docstring_parser

from modelcode.errors import ArgumentError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, not the whole usage: what was wrong, and where the rest is."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _unwrap(annotation) -> tuple[type, bool]:
    """(base type, is a list) of an annotation such as `int | None` or `list[str]`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def parser_for(fn: Callable, prog: str) -> argparse.ArgumentParser:
    doc = docstring_parser.parse(fn.__doc__ or "")
    helps = {p.arg_name: p.description for p in doc.params}
    parser = Parser(prog=prog, description="\n\n".join(filter(None, [doc.short_description, doc.long_description])),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    params = inspect.signature(fn).parameters
    # After a positional list, an option taking several words would swallow the positionals that follow it
    # (`--stop . "Lily" "Tom"`): there, list options take one word per flag, repeated for more.
    repeat = any(_unwrap(p.annotation)[1] and p.kind is p.POSITIONAL_OR_KEYWORD for p in params.values())
    for name, p in params.items():
        kind, is_list = _unwrap(p.annotation)
        has_default = p.default is not inspect.Parameter.empty
        kw = {"help": helps.get(name, "") + (f" (default: {p.default})" if has_default and p.default not in
                                              (None, (), []) else "")}
        if typing.get_origin(kind) is typing.Literal:
            kw["choices"], kind = typing.get_args(kind), type(typing.get_args(kind)[0])
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            nargs = ("*" if has_default else "+") if is_list else ("?" if has_default else None)
            parser.add_argument(name, type=kind, nargs=nargs, default=p.default if has_default else None,
                                metavar=name.upper(), **kw)
        elif kind is bool:
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=p.default, **kw)
        else:
            flags = {flag(name), f"--{name}"}
            if is_list and repeat:
                kw.update(action="append", help=kw["help"] + f" (one per {flag(name)}: repeat it)")
            elif is_list:
                kw["nargs"] = "+"
            parser.add_argument(*sorted(flags), dest=name, type=kind, default=p.default, required=not has_default,
                                **kw)
    return parser


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def run_command(fn: Callable, argv: list[str], prog: str) -> None:
    """`run`, with bad input reported in one line and exit status 2, instead of a traceback."""
    try:
        run(fn, argv, prog)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
    except ArgumentError as e:  # named as the flag the user typed, when the command has one
        name = flag(e.name) if e.name in inspect.signature(fn).parameters else e.name
        fail(prog, f"{name} {e.problem}")
    except (ValueError, OSError, KeyError, ImportError) as e:  # bad input: the message says what to do
        fail(prog, e.args[0] if isinstance(e, KeyError) and e.args else e)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def fail(prog: str, message) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def run(fn: Callable, argv: list[str], prog: str):
    args = vars(parser_for(fn, prog).parse_args(argv))
    params = inspect.signature(fn).parameters
    positional = [args.pop(n) for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    return fn(*positional, **args)
