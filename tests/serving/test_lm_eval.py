"""lm-eval's `local-completions` against the server (tokenized requests through /tokenize, echo with
logprobs): the per-item loglikelihoods and the accuracy equal scoring the items directly with the model."""

import json
from pathlib import Path

import lm_eval
import pytest
import torch
from live_server import live_server
from lm_eval.tasks import TaskManager

import modelcode

DATA = Path(__file__).parent / "data" / "stories_mc.jsonl"
MC_TASK = """task: stories_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_TASK = """task: stories_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def lm():
    return modelcode.load("tinystories-656k")


@pytest.fixture(scope="module")
def results(lm, tmp_path_factory):
    tasks = tmp_path_factory.mktemp("tasks")
    (tasks / "stories_mc.yaml").write_text(MC_TASK.format(data=DATA))
    (tasks / "stories_gen.yaml").write_text(GEN_TASK.format(data=DATA))
    with live_server(lm) as url:
        return lm_eval.simple_evaluate(
            model="local-completions", tasks=["stories_mc", "stories_gen"], log_samples=True,
            model_args={"base_url": f"{url}/v1/completions", "model": "tinystories-656k", "tokenized_requests": True,
                        "tokenizer_backend": "remote", "max_retries": 1, "max_length": 512},
            task_manager=TaskManager(include_path=str(tasks)))


def loglikelihood(lm, context: str, continuation: str) -> float:
    """log p(continuation | context), in tokens split as lm-eval splits them (no BOS): the context's own
    tokens, then what encoding both adds after as many tokens."""
    tok = lm.tokenizer
    context_ids = tok.encode(context)
    ids = context_ids + tok.encode(context + continuation)[len(context_ids):]
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(torch.tensor([ids])).float(), -1)[0]
    return sum(lp[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def test_multiple_choice_loglikelihoods_and_accuracy_match_the_model(results, lm):
    docs = [json.loads(line) for line in DATA.read_text().splitlines()]
    samples = sorted(results["samples"]["stories_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    correct = 0
    for sample, doc in zip(samples, docs):
        served = [r[0][0] for r in sample["resps"]]
        direct = [loglikelihood(lm, doc["context"], " " + c) for c in doc["choices"]]  # lm-eval's target_delimiter
        assert served == pytest.approx(direct, abs=1e-4)
        correct += max(range(len(direct)), key=direct.__getitem__) == doc["label"]
    assert results["results"]["stories_mc"]["acc,none"] == pytest.approx(correct / len(docs))


def test_generate_until_runs(results, lm):
    samples = results["samples"]["stories_gen"]
    assert len(samples) == 6
    for sample in samples:
        [[text]] = sample["resps"]
        ids = lm.tokenizer.encode(sample["doc"]["context"])
        expected = lm.generate([ids], 12, temperature=0, stop=["."])[0][0]
        assert text == lm.tokenizer.decode(ids + expected)[len(lm.tokenizer.decode(ids)):].split(".")[0]
