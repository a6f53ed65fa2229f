"""The real TinyStories-656K checkpoint, embedded in the package, equals transformers."""

import json
from pathlib import Path

import pytest
import torch
import transformers

import modelcode
from modelcode.api import EMBEDDED
from modelcode.errors import CheckpointError

FOLDER = EMBEDDED["tinystories-656k"]
REFERENCE = json.loads((FOLDER / "reference_outputs.json").read_text())["cases"]
BF16 = Path(__file__).parents[1] / "assets" / "tinystories-656k-bf16"


@pytest.fixture(scope="module")
def lm():
    return modelcode.load("tinystories-656k")


@pytest.mark.parametrize("case", REFERENCE, ids=lambda c: c["prompt"][:20])
def test_logits_equal_transformers(lm, case):
    hf = transformers.LlamaForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    tokens = torch.tensor([case["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", REFERENCE, ids=lambda c: c["prompt"][:20])
def test_golden_logits(lm, case):
    with torch.no_grad():
        logits = lm.model(torch.tensor([case["input_ids"]]))[0]
    top = logits[-1].topk(5)
    assert top.indices.tolist() == case["last_logits_top5_ids"]
    torch.testing.assert_close(top.values, torch.tensor(case["last_logits_top5_values"]), atol=1e-3, rtol=0)
    assert logits.sum().item() == pytest.approx(case["logits_sum"], abs=0.1)


def test_loads_in_requested_dtype():
    lm = modelcode.load("tinystories-656k", dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.model.rotary.inv_freq.dtype == torch.float32  # rotary tables stay exact


def test_original_bf16_upload_names_the_missing_output_layer():
    """The hub upload says tie_word_embeddings=false but stores no lm_head: say so, don't load garbage."""
    with pytest.raises(CheckpointError, match=r"missing .*'output\.weight' \(stored as 'lm_head\.weight'\)"
                                              r".*tie_word_embeddings"):
        modelcode.load(BF16)


def test_original_bf16_weights_tied_equal_float32(tmp_path, lm):
    """Fixed config, the bf16 weights give the float32 copy's logits bit for bit (it is an exact up-cast)."""
    for f in BF16.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((BF16 / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    bf16 = modelcode.load(tmp_path, dtype="float32")
    tokens = torch.tensor([REFERENCE[0]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(bf16.model(tokens), lm.model(tokens))
    assert modelcode.load(tmp_path).model.output.weight.dtype == torch.bfloat16  # checkpoint's dtype by default
