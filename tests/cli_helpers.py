"""Running a `modelcode` command as a user does, to test what it says about bad input."""

import re

import pytest

from modelcode.cli.__main__ import main as cli


def cli_error(argv: list[str], capsys, pattern: str = "") -> str:
    """The one line a command prints for bad input, last: it must exit with status 2, print no traceback, and
    match `pattern` (a regex)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err, err
    line = err.splitlines()[-1]  # what the command said before it (e.g. chat's greeting) may come first
    assert ": error: " in line and re.search(pattern, line), err
    return line
