"""Tensor parallelism on CPU (gloo, 2 processes): every model split across two ranks computes what it computes
whole (float32 logits within 1e-4, 32 greedy tokens equal, batched prompts of unequal lengths), quantized ones
too; bad input is one line. All the 2-process checks share one torchrun launch (see `tp_worker.py`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hf_reference import tiny_hf_model

import modelcode
from modelcode.api import EMBEDDED
from modelcode.loading import load_model
from modelcode.loading.checkpoint import read_tensors
from modelcode.parallel.shard import TensorParallel
from modelcode.quantization import quantize, save_quantized

ROOT = Path(__file__).parents[2]
STORIES = EMBEDDED["tinystories-656k"]


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS` with this checkout's modelcode."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def tiny_neox(folder: Path) -> Path:
    """A random GPT-NeoX (fused query_key_value) whose vocabulary (129) does not split in two: its embedding and
    head stay whole on each rank."""
    config = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=129, max_position_embeddings=64,
                                        rotary_pct=0.5, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    model.save_pretrained(folder)
    return folder


def quantized_stories(mode: str, folder: Path) -> Path:
    lm = modelcode.load("tinystories-656k")
    quantize(lm.model, mode, 32, pack=False)
    return save_quantized(lm.model, STORIES, folder)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """{case: {"tp1": outputs, "tp2": outputs}} from one 2-process launch."""
    d = tmp_path_factory.mktemp("tp")
    for variant in ("llama3-gqa", "qwen2-qkv-bias"):
        tiny_hf_model(variant).save_pretrained(d / variant)
    cases = {
        "llama3-gqa": d / "llama3-gqa",
        "qwen2-qkv-bias": d / "qwen2-qkv-bias",
        "gpt-neox": tiny_neox(d / "gpt-neox"),
        "tinystories-656k": STORIES,
        "tinystories-int8": quantized_stories("int8", d / "int8"),
        "tinystories-int4": quantized_stories("int4", d / "int4"),
    }
    spec = {name: {"path": str(path)} for name, path in cases.items()}
    spec["tinystories-compiled"] = {"path": str(STORIES), "compile": True}
    (d / "cases.json").write_text(json.dumps(spec))
    run = torchrun("tests/parallel/tp_worker.py", str(d / "cases.json"), str(d / "out.pt"))
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(d / "out.pt")


@pytest.mark.parametrize("case", ["llama3-gqa", "qwen2-qkv-bias", "gpt-neox", "tinystories-656k",
                                  "tinystories-int8", "tinystories-int4", "tinystories-compiled"])
def test_two_ranks_equal_one(results, case):
    """tinystories-compiled: tp=2 with compiled decode steps, against tp=1 eager."""
    tp1, tp2 = results[case]["tp1"], results[case]["tp2"]
    assert tp2["tokens"] == tp1["tokens"]
    assert [len(t) for t in tp2["tokens"]] == [32, 32, 32]
    torch.testing.assert_close(tp2["logits"], tp1["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["llama3-gqa", "tinystories-656k", "tinystories-int8"])
def test_each_rank_holds_about_half(results, case):
    """Norms are all a rank holds twice: the rest is split (vocabularies that divide by 2 included)."""
    tp1, tp2 = results[case]["tp1"]["parameters"], results[case]["tp2"]["parameters"]
    assert tp2 < 0.52 * tp1


def test_a_rank_reads_its_part_of_a_stored_tensor(tmp_path):
    """Rows through safetensors' get_slice, columns (and past) by positional reads: the same values either way."""
    from safetensors.torch import save_file

    tensors = {"w": torch.randn(6, 10, dtype=torch.bfloat16), "x": torch.randn(3, 4, 8),
               "q": torch.randint(0, 255, (5, 12), dtype=torch.uint8)}
    save_file(tensors, tmp_path / "model.safetensors")
    for st in read_tensors([tmp_path / "model.safetensors"]):
        t = tensors[st.name]
        for dim, size in enumerate(t.shape):
            for start, stop in [(0, size // 2), (size // 2, size)]:
                assert torch.equal(st.part(dim, start, stop), t.narrow(dim, start, stop - start)), (st.name, dim)


def test_tp_that_does_not_divide_the_heads():
    model, config, _ = load_model(STORIES)  # 8 heads, 4 key/value heads
    with pytest.raises(ValueError, match=r"tp=3 does not divide the model's 8 attention heads: .*\(1, 2, 4\)"):
        TensorParallel(rank=0, world=3).check(model, config)


def run_cli(*argv: str) -> int:
    from modelcode.cli.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


def test_tp_without_torchrun(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert run_cli("generate", "--tp", "2", "--max-new-tokens", "2") == 2
    assert capsys.readouterr().err == ("modelcode generate: error: tp=2 runs one process per rank, started by "
                                       "torchrun: torchrun --standalone --nproc-per-node 2 --no-python modelcode "
                                       "generate ... --tp 2\n")


def test_world_size_that_differs_from_tp(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert run_cli("generate", "--tp", "2", "--max-new-tokens", "2") == 2
    assert capsys.readouterr().err == ("modelcode generate: error: tp=2 but torchrun started 4 processes: launch with "
                                       "--nproc-per-node 2, or pass --tp 4\n")


def test_bench_with_tp_measures_our_model_alone(capsys):
    assert run_cli("bench", "--tp", "2") == 2  # transformers would be benched too: checked before any process joins
    assert "--tp measures our model alone, as loaded: add --no-hf" in capsys.readouterr().err


def test_cli_under_torchrun_prints_once():
    """`torchrun ... modelcode generate --tp 2` prints what the one-process command prints, once."""
    args = ["generate", "Once upon a time", "--max-new-tokens", "16", "--dtype", "float32"]
    alone = subprocess.run([sys.executable, "-m", "modelcode.cli", *args], cwd=ROOT, capture_output=True, text=True)
    run = torchrun("-m", "modelcode.cli", *args, "--tp", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == alone.stdout and alone.stdout.count("Once upon a time") == 1
    assert run.stderr.count("tokens/s]") == 1


def test_cli_under_torchrun_heads_that_do_not_split(tmp_path):
    """A model of 3 heads at --tp 2: one line from rank 0, and both ranks exit (torchrun adds its own report)."""
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=3,
                                      vocab_size=128)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    run = torchrun("-m", "modelcode.cli", "generate", "--model", str(tmp_path), "--tp", "2", timeout=120)
    assert run.returncode != 0  # torchrun's own status: 1 when a rank fails
    ours = [line for line in run.stderr.splitlines() if line.startswith("modelcode generate: error:")]
    assert ours == ["modelcode generate: error: tp=2 does not divide the model's 3 attention heads: use a tp that "
                    "divides 3 attention heads, 3 key/value heads, 96 feed-forward width (1, 3)"]
