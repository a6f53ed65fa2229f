"""Rules the repository keeps: which packages may import which, and files that describe what is, not what was.

The learner's path (`layers/`, `models/`) holds only the plain computation: kernels, quantization and
generation are applied to a built model from outside, so those packages never appear in its imports. Past
runs belong in git log: no file names a run or a session by number, and only BENCHMARKS.md's machine lines
carry a date (results files record their own).
"""

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "modelcode"

# package -> packages of modelcode it must not import (imports run one way)
FORBIDDEN = {
    "layers": ("kernels", "quantization", "generation", "loading", "models"),
    "models": ("kernels", "quantization", "generation", "loading"),
    "kernels": ("quantization", "generation", "loading"),
    "quantization": ("generation", "loading"),
}

# "session 7", "run 12", "runs 5-7", "round 3", "(session 4)": references to numbered past runs
NUMBERED_RUN = re.compile(r"\b(sessions?|runs?|rounds?|attempts?) #?\d+\b", re.IGNORECASE)
DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
# Narrating the past or promising the future, rather than saying what is.
# "yet" only a few words after a negation, whitespace apart ("has no generate() yet"; "not-yet-cached" passes);
# "seen:" only before a figure ("(seen: 45 GB/s)"; "not in seen:" passes).
NARRATIVE = re.compile(r"\b(in an earlier (session|run)|we tried|of then\b|will be added|coming soon|\bTODO\b|"
                       r"in (two|three|\d+) other runs|not landed|in progress|(seen|measured earlier):\s*~?\d|"
                       r"(no|not|isn't)(\s+\S+){0,3}?\s+yet\b)", re.IGNORECASE)
THIRD_PARTY = ("tests/assets/", "modelcode/assets/")  # others' files, kept as they were published


def imported_packages(source: str, path: Path) -> set[str]:
    """The modelcode subpackages a file at `path` imports (`from modelcode.kernels.cpu import x` -> "kernels")."""
    names = set()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: against the file's own package
            base = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-node.level])
            names |= {f"{base}.{node.module}"} if node.module else {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n.split(".")[1] for n in names if n.startswith("modelcode.")}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package):
    wrong = {str(f.relative_to(ROOT)): sorted(imported_packages(f.read_text(), f) & set(FORBIDDEN[package]))
             for f in sorted((PACKAGE / package).rglob("*.py"))}
    assert not {f: p for f, p in wrong.items() if p}, f"modelcode/{package} must not import {FORBIDDEN[package]}"


def test_the_import_check_sees_absolute_and_relative_imports():
    as_if_in_layers = PACKAGE / "layers" / "norm.py"
    source = "from modelcode.kernels.cpu import x\nfrom ..quantization import y\nimport modelcode.generation.z\n" \
             "from modelcode import loading\nfrom . import rotary\n"
    assert imported_packages(source, as_if_in_layers) == {"kernels", "quantization", "generation", "loading", "layers"}


def repository_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in listed.splitlines() if not f.startswith(THIRD_PARTY) and (ROOT / f).is_file()]


def history_in(relative: str, text: str) -> list[str]:
    """Lines of a file that log or cite past runs."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        dated = DATE.search(line) and not (relative == "BENCHMARKS.md" and "measured" in line)
        if NUMBERED_RUN.search(line) or NARRATIVE.search(line) or dated:
            found.append(f"{relative}:{number}: {line.strip()[:100]}")
    return found


def test_no_file_logs_or_cites_past_runs():
    found = []
    for path in repository_text_files():
        relative = str(path.relative_to(ROOT))
        if NUMBERED_RUN.search(path.name) or DATE.search(relative):
            found.append(f"{relative}: a results file is named by its run; give it a stable name")
        if path.suffix in (".json", ".png", ".safetensors") or path == Path(__file__):
            continue  # results record their own machine and date; this file holds the patterns
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += history_in(relative, text)
    assert not found, "history belongs in git log:\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    "// fast as the kernel this one replaced (session 7).",
    "runs 12-14 of `quantized.py` at 06:18 UTC",
    "## Earlier machine (2026-11-22)",
    "where the dense matmul had taken 98 in an earlier session.",
    "int8 (the row-major kernel of then) 1.09x faster",
    "int4/q4_0 was 1.27× and 1.29× in two other runs.",
    "has no generate() yet (the generation work has not landed)",
    "is not in the registry yet (its model file is still in progress)",
    "isn't built yet",
    "can change by half (seen: 45 to 76 GB/s on a 2-core VM)",
    "1.3x (measured earlier: 1.1x)",
])
def test_the_history_check_catches_run_logs(line):
    assert history_in("modelcode/kernels/cpu.cpp", line)


@pytest.mark.parametrize("line", [
    "| Zen 5 VM | 2-core AMD EPYC | measured 2026-12-01 and 2026-12-02 |",
    "each round running every configuration once; a ratio is the median of the rounds' own ratios",
    "k = 8 steps per call (and check for stops after each call)",
    "Run the not-yet-cached part of each prompt through the model, filling the cache.",
    "if t is not None and id(t) not in seen:",
    "no token is emitted before the prompt is read, and yet the cache holds it",
])
def test_the_history_check_lets_descriptions_pass(line):
    assert not history_in("BENCHMARKS.md", line)
