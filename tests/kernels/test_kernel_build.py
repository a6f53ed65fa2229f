"""The first run's kernel build: keyed by its sources (two installs never rebuild each other's), said while
it happens, and a failure said in one line, once."""

import functools
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
    copies = [shutil.copy(f, tmp_path / f.rsplit("/", 1)[-1]) for f in cpu.chosen_build().paths()]
    monkeypatch.setattr(cpu.Build, "paths", lambda self: copies)
    assert cpu.build_directory() == ours  # another install of the same sources shares the build
    with open(copies[0], "a") as f:
        f.write("\n// changed\n")
    assert cpu.build_directory() != ours


def test_each_instruction_set_builds_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folders = set()
    for isa in cpu.BUILDS:
        monkeypatch.setenv("MODELCODE_CPU_KERNELS", isa)
        folders.add(cpu.build_directory())
    assert len(folders) == len(cpu.BUILDS)


AVX512 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}


@pytest.mark.parametrize("flags, chosen", [(AVX512, "avx512"), ({"avx2", "fma", "f16c", "avx512f"}, "avx2"),
                                           ({"avx2", "fma", "f16c"}, "avx2"), ({"avx", "sse4_2"}, None)])
def test_the_build_is_chosen_by_the_cpus_instruction_sets(flags, chosen, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    monkeypatch.delenv("MODELCODE_CPU_KERNELS", raising=False)
    monkeypatch.delenv("MODELCODE_NO_CPU_KERNELS", raising=False)
    assert cpu.instruction_set() == chosen
    if chosen is None:
        assert cpu.why_unavailable() == "this CPU has neither AVX-512 (BF16, VNNI) nor AVX2 with FMA"
    monkeypatch.setenv("MODELCODE_CPU_KERNELS", "avx512")  # asked for: used where the CPU has it, else said why
    assert cpu.instruction_set() == "avx512"
    if chosen != "avx512":
        assert cpu.why_unavailable().startswith("this CPU lacks ")
    monkeypatch.setenv("MODELCODE_CPU_KERNELS", "sse")
    with pytest.raises(ValueError, match="MODELCODE_CPU_KERNELS='sse': give avx512 or avx2"):
        cpu.instruction_set()


def test_the_avx2_kernels_on_a_cpu_that_has_avx512_too():
    """Where the AVX-512 build runs, the AVX2 one is checked too: the kernel tests again, in a fresh process
    (a process loads one build of the operations) that asks for it."""
    if cpu.instruction_set() != "avx512" or not cpu.kernels_available():
        pytest.skip(f"this session's kernel tests run the {cpu.instruction_set()} build, if any")
    tests = Path(__file__).parents[1]
    files = [str(tests / "kernels" / "test_cpu_kernels.py"), str(tests / "quantization" / "test_linear.py")]
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "bf16 or our", *files],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "MODELCODE_CPU_KERNELS": "avx2"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = [line for line in done.stdout.splitlines() if " passed" in line]  # "12 passed in 30.1s"
    assert summary and "skipped" not in summary[-1], done.stdout[-2000:]
    assert "used (AVX2 build)" in done.stdout


def test_a_failed_build_says_so_in_one_line_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.delenv("MODELCODE_NO_CPU_KERNELS", raising=False)
    flags = set(cpu.chosen_build().cpu_flags)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
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


@pytest.mark.parametrize("vendor, int8, int4", [("AuthenticAMD", "nta:8192", "nta:8192"),
                                                ("GenuineIntel", "t1:4096", "t0:2048"), ("", "t1:4096", "t0:2048")])
def test_quantized_weights_are_prefetched_as_suits_the_vendor(vendor, int8, int4, monkeypatch):
    # AMD's Zen: non-temporal keeps the rest of the step cached; Intel's server cores stream NTA lines at half speed
    # and keep few lines in flight to L1
    monkeypatch.setattr(cpu, "cpuinfo", lambda field: {"vendor_id": vendor}.get(field, ""))
    for kernel, expected in (("int8", int8), ("int4", int4)):
        variable = f"MODELCODE_{kernel.upper()}_PREFETCH"
        allowed = r"nta, t0 or t1 and the bytes ahead, a multiple of 64 up to 65536"
        choose = functools.partial(cpu.quantized_prefetch, kernel)
        assert_chosen(choose, variable, expected, "t1:1024", "t2:1024", allowed, monkeypatch)
        for invalid in ("t0", "t0:100", "t0:131072", "nta:-64"):
            monkeypatch.setenv(variable, invalid)
            with pytest.raises(ValueError, match=variable):
                cpu.quantized_prefetch(kernel)


def test_every_prefetch_setting_gives_the_same_outputs():
    # the library reads the settings as it loads, so each runs in its own process
    if not cpu.kernels_available():
        pytest.skip(f"the kernels are not used here: {cpu.why_unavailable()}")
    probe = ("import torch; from modelcode.kernels import cpu; cpu.kernels_available(); torch.manual_seed(0); "
             "w, sz = cpu.pack_int4(torch.randint(0, 16, (64, 256)), torch.rand(64, 8).bfloat16(), "
             "torch.rand(64, 8).bfloat16()); x = torch.randn(3, 256).bfloat16(); "
             "q = cpu.pack_int8(torch.randint(-127, 128, (64, 256), dtype=torch.int8)); "
             "print(cpu.int4_mm(x, w, sz, 32).float().sum().item(), "
             "cpu.int8_mm(x, q, torch.rand(64).bfloat16()).float().sum().item())")
    outputs = set()
    for setting in ("nta:8192", "t0:2048", "t1:0"):
        env = {**os.environ, "MODELCODE_INT8_PREFETCH": setting, "MODELCODE_INT4_PREFETCH": setting}
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    assert len(outputs) == 1


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
