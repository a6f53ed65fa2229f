"""`modelcode finetune` end to end: a shortened run of the README's worked example on TinyStories-656K, and the
output folders it writes (merged model for modelcode and transformers, peft adapter, log, curve, state)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import modelcode
from modelcode.training.data import instruction_prompt

DATA = Path(__file__).parents[2] / "examples" / "finetune" / "named-stories.jsonl"
PROMPT = instruction_prompt("Write a story about a lion named Zoe.")  # a pair the data leaves out


def test_data_file_is_what_the_generator_writes(tmp_path):
    sys.path.insert(0, str(DATA.parent))
    try:
        from make_stories import records
    finally:
        sys.path.pop(0)
    assert DATA.read_text() == "".join(json.dumps(r) + "\n" for r in records())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "out"
    cmd = [sys.executable, "-m", "modelcode.cli", "finetune", "--data", str(DATA), "--out", str(out),
           "--max-steps", "40", "--batch-size", "8", "--lr", "5e-3", "--lora-targets", "all", "--eval-every", "20"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout


def test_worked_example_learns_the_new_behaviour(run):
    out, stdout = run
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start, end = log[0]["val_loss"], log[-1]["val_loss"]
    assert start > 4.0 and end < 1.0, (start, end)  # the README's full run: 4.4 -> 0.17
    before = modelcode.load("tinystories-656k").text_completion([PROMPT], max_new_tokens=24)[0]["generation"]
    after = modelcode.load(out).text_completion([PROMPT], max_new_tokens=24)[0]["generation"]
    assert "Zoe" not in before and "Once upon a time, there was a" in after and "named Zoe" in after, (before, after)
    assert "134 training and 7 validation examples; 0 cut to the context, 0 skipped" in stdout


def test_outputs_load_in_transformers_and_peft(run):
    import peft

    out, _ = run
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json", "log.jsonl",
                                               "loss.png", "adapter", "training", "generation_config.json"}
    tokens = torch.tensor([modelcode.load(out).tokenizer.encode(PROMPT, bos=True)])
    with torch.no_grad():
        ours = modelcode.load(out, dtype=torch.float32).model(tokens)
        merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(merged(tokens).logits, ours, atol=1e-4, rtol=1e-4)
        base = transformers.AutoModelForCausalLM.from_pretrained(modelcode.api.EMBEDDED["tinystories-656k"],
                                                                 dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        torch.testing.assert_close(adapted(tokens).logits, ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(modelcode.load("tinystories-656k", adapter=out / "adapter").model(tokens), ours,
                                   atol=1e-5, rtol=1e-5)


def test_output_folder_must_be_new(run):
    out, _ = run
    done = subprocess.run([sys.executable, "-m", "modelcode.cli", "finetune", "--data", str(DATA), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "is not empty: choose a new one, or --resume" in done.stderr


def test_full_fine_tuning_and_qlora_write_loadable_folders(tmp_path):
    from modelcode.training.finetune import FinetuneConfig, finetune
    from modelcode.training.loop import TrainConfig

    records = [json.loads(line) for line in DATA.read_text().splitlines()[:12]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, cfg in (("full", FinetuneConfig(method="full", train=TrainConfig(max_steps=2, lr=1e-4))),
                      ("int8", FinetuneConfig(quantize="int8", train=TrainConfig(max_steps=2, lr=1e-2)))):
        result = finetune("tinystories-656k", data, tmp_path / name, cfg)
        assert len(result.log) == 3 and (tmp_path / name / "model.safetensors").exists()
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
        tokens = torch.tensor([[1, 80, 147, 201]])
        with torch.no_grad():
            torch.testing.assert_close(reloaded(tokens).logits, result.lm.model(tokens), atol=1e-4, rtol=1e-4)
    assert (tmp_path / "int8" / "adapter" / "adapter_model.safetensors").exists()
