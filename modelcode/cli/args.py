"""Typed functions are the CLI: build an argparse parser from a `main(...)` signature and docstring.

Python's positional parameters become positional arguments (a `list[...]` one takes any number of
words); keyword-only parameters become `--options` (spelled with dashes or underscores). The defaults
live only in the signature and each option's help comes from the `Args:` section of the docstring.
"""

import argparse
import inspect
import types
import typing
from collections.abc import Callable

import docstring_parser


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
    parser = argparse.ArgumentParser(prog=prog, description="\n\n".join(filter(None, [doc.short_description,
                                     doc.long_description])), formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, p in inspect.signature(fn).parameters.items():
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
            parser.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                                default=p.default, **kw)
        else:
            flags = {f"--{name.replace('_', '-')}", f"--{name}"}
            parser.add_argument(*sorted(flags), dest=name, type=kind, nargs="+" if is_list else None,
                                default=p.default, required=not has_default, **kw)
    return parser


def run(fn: Callable, argv: list[str], prog: str):
    args = vars(parser_for(fn, prog).parse_args(argv))
    params = inspect.signature(fn).parameters
    positional = [args.pop(n) for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    return fn(*positional, **args)
