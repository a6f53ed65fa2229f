"""The first run's kernel build: keyed by its sources (two installs never rebuild each other's), said while
it happens, and a failure said in one line, once."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelcode.kernels import cpu


def test_build_directory_is_keyed_by_the_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ours = cpu.build_directory()
    assert ours.parent == tmp_path / "modelcode"
    copies = [shutil.copy(f, tmp_path / f.rsplit("/", 1)[-1]) for f in cpu.SOURCES]
    monkeypatch.setattr(cpu, "SOURCES", copies)
    assert cpu.build_directory() == ours  # another install of the same sources shares the build
    with open(copies[0], "a") as f:
        f.write("\n// changed\n")
    assert cpu.build_directory() != ours


def test_a_failed_build_says_so_in_one_line_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.delenv("MODELCODE_NO_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: set(cpu.NEEDED_CPU_FLAGS))
    build = cpu.kernels_available.__wrapped__  # not the process's cached answer
    assert not build()
    status, failure = capsys.readouterr().err.strip().splitlines()
    assert status == "modelcode: building the CPU kernels, once (about 30 s) ... failed"
    assert failure.startswith("modelcode: the CPU kernels could not be built (no C++ compiler (no-such-compiler) on "
                              "the PATH); PyTorch's kernels run instead. Details: ")
    assert not build() and capsys.readouterr().err == ""  # said once: later runs do not try again


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_run():
    if not cpu.kernels_available():
        pytest.skip(f"the kernels are not used here: {cpu.why_unavailable()}")
    folder = cpu.build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lock").touch()  # what PyTorch's build leaves when it is killed midway
    probe = "from modelcode.kernels.cpu import kernels_available; print(kernels_available())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert done.stdout.strip() == "True", done.stderr or cpu.why_unavailable()


def assert_chosen(choose, variable: str, expected: str, own: str, invalid: str, allowed: str, monkeypatch) -> None:
    """`choose()` gives `expected` for the faked CPU, a user's own `variable` wins, and an unknown one is an error."""
    monkeypatch.delenv(variable, raising=False)
    assert choose() == expected
    monkeypatch.setenv(variable, own)
    assert choose() == own
    monkeypatch.setenv(variable, invalid)
    with pytest.raises(ValueError, match=f"{variable}='{invalid}': give {allowed}"):
        choose()


@pytest.mark.parametrize("vendor, hint", [("AuthenticAMD", "nta"), ("GenuineIntel", "t0"), ("", "t0")])
def test_quantized_weights_are_prefetched_as_suits_the_vendor(vendor, hint, monkeypatch):
    # AMD's Zen: non-temporal keeps the rest of the step cached; Intel's server cores stream NTA lines at half speed
    monkeypatch.setattr(cpu, "cpuinfo", lambda field: {"vendor_id": vendor}.get(field, ""))
    assert_chosen(cpu.quantized_prefetch, "MODELCODE_QUANTIZED_PREFETCH", hint, "nta", "t1", "nta or t0", monkeypatch)


@pytest.mark.parametrize("vendor, family, hint", [("AuthenticAMD", "25", "none"), ("AuthenticAMD", "26", "t1"),
                                                  ("GenuineIntel", "6", "t1"), ("", "", "t1")])
def test_bf16_weights_are_prefetched_as_suits_the_cpu(vendor, family, hint, monkeypatch):
    # Zen 4's hardware prefetcher streams faster alone; Zen 5 and Intel's cores gain from asking a run ahead
    monkeypatch.setattr(cpu, "cpuinfo", lambda field: {"vendor_id": vendor, "cpu family": family}.get(field, ""))
    assert_chosen(cpu.bf16_prefetch, "MODELCODE_BF16_PREFETCH", hint, "t1", "t0", "none or t1", monkeypatch)


def test_cpuinfo_reads_this_machine():
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo: not Linux")
    assert cpu.cpuinfo("vendor_id") and "fpu" in cpu.cpu_flags()


def test_a_second_install_in_another_folder_does_not_rebuild_the_first(tmp_path):
    if not cpu.kernels_available():
        pytest.skip(f"the kernels are not used here: {cpu.why_unavailable()}")
    package = Path(cpu.__file__).parents[1]
    shutil.copytree(package, tmp_path / "modelcode", ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import modelcode; from modelcode.kernels import cpu; "
             "print(modelcode.__file__, cpu.kernels_available(), cpu.build_directory())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    where, available, folder = done.stdout.split()
    assert where.startswith(str(tmp_path)), "the probe must import the second install"
    assert (available, folder) == ("True", str(cpu.build_directory()))
    assert "building" not in done.stderr  # it found the first install's build and loaded it as it was
