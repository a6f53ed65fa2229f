"""A small model's compiled steps, compiled ahead of time once and kept per machine (`generation/aot.py`):
the same tokens as plain generation, loaded by a later model instead of compiled again, never loaded for
other weights, and never compiled by `compile_if_saved` or `build=False`."""

import pytest
import torch

import modelcode
from modelcode.generation import aot

PROMPTS = [[1, 415, 1261, 263, 931], [1, 903, 1501, 263]]


@pytest.fixture(scope="module")
def plain():
    return modelcode.load("tinystories-656k")


@pytest.fixture(scope="module")
def built(plain):
    """A model whose steps were compiled into the store: greedy at batch 1, sampled with logprobs at batch 2."""
    lm = modelcode.load("tinystories-656k").compile(max_seq_len=128, autotune=False)
    assert lm.compiled.saved and not aot.has_packages(lm.fingerprint())
    lm.generate(PROMPTS[:1], max_new_tokens=2)
    lm.generate(PROMPTS, max_new_tokens=2, temperature=0.8, top_p=0.9, seed=1, logprobs=True)
    return lm


def no_compiling(*args):
    raise AssertionError("compiled again")


def test_saved_steps_equal_plain_generation(plain, built):
    assert aot.has_packages(built.fingerprint())
    for n in (1, 7, 40):  # budgets inside and across the 8 steps of a call
        assert built.generate(PROMPTS[:1], max_new_tokens=n) == plain.generate(PROMPTS[:1], max_new_tokens=n)
    settings = dict(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=7, logprobs=True)
    (got, got_lp), (expected, expected_lp) = built.generate(PROMPTS, **settings), plain.generate(PROMPTS, **settings)
    assert got == expected
    torch.testing.assert_close(sum(got_lp, []), sum(expected_lp, []), atol=1e-4, rtol=0)


def test_a_later_model_loads_the_saved_steps_instead_of_compiling(plain, built, monkeypatch):
    monkeypatch.setattr(aot, "build_package", no_compiling)
    later = modelcode.load("tinystories-656k")
    assert later.compile_if_saved() and later.compiled.build is False  # the defaults: a graph of its own
    later.compile(max_seq_len=128, autotune=False, build=False)  # the settings `built` compiled with
    assert later.generate(PROMPTS[:1], max_new_tokens=30) == plain.generate(PROMPTS[:1], max_new_tokens=30)
    assert later.compiled._packages  # it ran the saved package, not eager steps


def test_other_weights_never_load_them_and_build_false_runs_eagerly(plain, built, monkeypatch):
    monkeypatch.setattr(aot, "build_package", no_compiling)
    other = modelcode.load("tinystories-656k")
    with torch.no_grad():
        other.model.norm.weight.mul_(torch.linspace(0.5, 1.5, other.model.norm.weight.numel()))
    assert other.fingerprint() != built.fingerprint() and not other.compile_if_saved()
    expected = other.generate(PROMPTS[:1], max_new_tokens=20)
    assert expected != plain.generate(PROMPTS[:1], max_new_tokens=20)
    other.compile(max_seq_len=128, autotune=False, build=False)
    assert other.generate(PROMPTS[:1], max_new_tokens=20) == expected and not other.compiled._packages
    assert other.wants_saved_steps()  # what the CLI asks before compiling them in the background


def test_bfloat16_with_the_cpu_kernels_compiles_ahead_of_time():
    from test_compile import assert_each_token_is_a_near_argmax

    lm = modelcode.load("tinystories-656k", dtype="bfloat16").compile(max_seq_len=96, autotune=False)
    got, _ = lm.generate(PROMPTS[:1], max_new_tokens=30)
    assert lm.compiled._packages
    assert_each_token_is_a_near_argmax(lm.model, PROMPTS[0], got[0])



def test_a_first_eager_generate_compiles_the_steps_in_the_background_for_the_next(monkeypatch, tmp_path, capsys):
    """`modelcode generate` without saved steps decodes eagerly, then starts a `--compile` of the same command
    line in a process of its own (one at a time); the next run loads what it built instead of decoding eagerly."""
    from modelcode.cli import generate

    monkeypatch.setenv("MODELCODE_CACHE", str(tmp_path))  # an empty store, also the background process's
    monkeypatch.setenv("MODELCODE_BACKGROUND_BUILD", "1")
    started, start = [], aot.build_in_background
    monkeypatch.setattr(aot, "build_in_background", lambda *args: started.append(start(*args)) or started[-1])
    run = dict(model="tinystories-656k", max_new_tokens=12, temperature=0.0)
    generate.main(["-Once upon a time"], **run)  # a prompt that looks like an option stays the prompt
    first = capsys.readouterr()
    assert "in the background" in first.err and len(started) == 1
    generate.main(["-Once upon a time"], **run)  # still building: not started twice
    assert started[1] is None and capsys.readouterr().out == first.out
    assert started[0].wait(timeout=900) == 0, (tmp_path / f"{modelcode.load('tinystories-656k').fingerprint()}.log")
    monkeypatch.setattr(aot, "build_package", no_compiling)
    loaded, load = [], aot.load_package
    monkeypatch.setattr(aot, "load_package", lambda path: loaded.append(path) or load(path))
    generate.main(["-Once upon a time"], **run)
    again = capsys.readouterr()
    assert loaded and again.out == first.out and "in the background" not in again.err and len(started) == 2


def test_a_background_build_that_failed_is_not_started_again(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELCODE_CACHE", str(tmp_path))
    command = ["generate", "--compile", "--model", str(tmp_path / "missing")]
    failed = aot.build_in_background("key", command)
    assert failed.wait(timeout=120) == 2 and "missing" in (aot.store() / "key.log").read_text()
    assert aot.build_in_background("key", command) is None
