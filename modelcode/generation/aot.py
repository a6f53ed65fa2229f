"""Compiled decode steps of small models, compiled ahead of time once per machine and kept on disk.

Compiling a decode step costs about a minute on CPU (dynamo traces the unrolled steps, inductor lowers and
autotunes them, a C++ compiler builds the result), and torch's own caches take the second compile only to
about 50 s: tracing and lowering run again. That is nothing beside a long run of a large model, and
everything beside the few hundred tokens a small model is asked for. So for models of at most
`SMALL_MODEL_BYTES` of weights on CPU, the step is exported (`torch.export`) and compiled ahead of time by
AOTInductor into a package (a shared library with the weights as constants, a `.pt2` file) that a later
process loads in about 0.1 s and calls with no Python between its kernels.

A package holds one model's weights and one (batch size, sampling setting) graph, so its name is two hashes:
the model's (class, config, every weight's bytes), and the graph's (batch size, sampling, steps per call,
cache length, compile settings, and what makes code built here run only here: torch's version, the CPU,
modelcode's kernel build). Packages live in `~/.cache/modelcode/decode-steps/` (`MODELCODE_CACHE` or
`XDG_CACHE_HOME` move it); deleting the folder only costs a compile.

A user should not have to know to ask: when `modelcode generate` or `chat` has just decoded a small model eagerly
for want of a package, it starts `build_in_background`, a `--compile` of the same command line in a process of
its own that outlives it, so that the next run loads the compiled steps (MODELCODE_BACKGROUND_BUILD=0: never).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from modelcode.kernels.cpu import build_directory, cpuinfo


def store() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("MODELCODE_CACHE") or cache / "modelcode") / "decode-steps"


def model_fingerprint(model: nn.Module) -> str:
    """A hash of what the compiled steps take as constants: the model's class, config and every weight."""
    h = hashlib.sha256(f"{type(model).__name__} {model.config!r}".encode())
    for name, t in [*model.state_dict().items()]:
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def graph_fingerprint(*parts: object) -> str:
    """A hash of the graph's settings (`parts`) and of this machine's toolchain: torch, the CPU, the kernels."""
    machine = (torch.__version__, cpuinfo("model name"), cpuinfo("flags"), build_directory().name)
    return hashlib.sha256(repr((machine, parts)).encode()).hexdigest()[:16]


def package_path(model_key: str, graph_key: str) -> Path:
    return store() / f"{model_key}-{graph_key}.pt2"


def has_packages(model_key: str) -> bool:
    """Whether any graph of this model has been compiled on this machine."""
    return any(store().glob(f"{model_key}-*.pt2"))


def build_package(steps: nn.Module, example: tuple, settings: dict, path: Path) -> None:
    """Export `steps` on `example` inputs and compile it ahead of time under inductor `settings` into `path`
    (written next to it first, then renamed: a process reading the store never sees half a package)."""
    from torch._inductor import config

    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(steps, example, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}.pt2")
    with config.patch(settings):
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
    os.replace(partial, path)


def load_package(path: Path):
    """The compiled steps of a package: called with the inputs it was exported with, flattened."""
    # torch's `aoti_load_package` first compares the device the package was built for with this one, which costs
    # ~0.4 s of a command's start (it imports inductor's code cache and probes the CPU by compiling test programs).
    # A package of this store was built on this machine (its name holds the CPU's flags and torch's version), so
    # its loader is made directly.
    from torch.export.pt2_archive._package import AOTICompiledModel

    return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1))


def background_builds() -> bool:
    return os.environ.get("MODELCODE_BACKGROUND_BUILD", "1") != "0"


def build_in_background(model_key: str, command: list[str]) -> subprocess.Popen | None:
    """Start `modelcode COMMAND` (a command line with --compile: it compiles this model's steps into the store)
    in a process of its own that outlives this one, at low priority, writing to `<store>/<model_key>.log`.
    Returns it, or None while an earlier build of this model runs, or if this command line was started before
    (its build failed or was stopped: the log says why, and `--compile` shows it). `<store>/<model_key>.builds`
    keeps a line per build started: its pid and command line."""
    folder = store()
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{model_key}.builds"
    builds = [line.split(" ", 1) for line in record.read_text().splitlines()] if record.exists() else []
    if (builds and _alive(int(builds[-1][0]))) or any(json.loads(started) == command for _, started in builds):
        return None
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []  # the user's next run comes first
    with open(folder / f"{model_key}.log", "wb") as log:
        process = subprocess.Popen([*nice, sys.executable, "-m", "modelcode.cli", *command], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "MODELCODE_BACKGROUND_BUILD": "0"})
    with open(record, "a") as f:
        f.write(f"{process.pid} {json.dumps(command)}\n")
    return process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
