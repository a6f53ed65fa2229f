"""Run by `test_tensor_parallel.py` under torchrun (2 processes, gloo): loads each checkpoint named in
CASES.json whole (tp=1) and split across the 2 processes (tp=2), and writes what `outputs` computes for both,
from rank 0, to OUT.pt. One launch runs every case; both runs share the process, so the same kernels."""

import json
import sys
from pathlib import Path

import torch

import modelcode

# Prompts of unequal lengths, batched; ids below every test model's vocabulary.
PROMPTS = [[1, 17, 42, 99, 5, 23, 8, 64, 3, 77, 12], [1, 9, 120, 33], [1, 100, 2, 57, 81, 6, 44]]
NEW_TOKENS = 32


def outputs(path: str, tp: int | None, compile: bool = False) -> dict:
    """A full causal pass's logits on the padded prompts, and 32 greedy tokens per prompt, batched."""
    lm = modelcode.load(path, dtype=torch.float32, tp=tp)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in PROMPTS])
    with torch.no_grad():
        logits = lm.model(ids)
    if compile:  # one step per compiled call: the smallest graph, the shortest compile
        lm.compile(max_seq_len=64, freeze=False, autotune=False, steps_per_call=1)
    tokens, _ = lm.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0, stop_ids=frozenset())
    return {"logits": torch.as_tensor(logits).clone(), "tokens": tokens,
            "parameters": sum(p.numel() for p in lm.model.parameters())}


def main(cases_file: str, out: str) -> None:
    cases = json.loads(Path(cases_file).read_text())
    results = {}
    for name, case in cases.items():
        results[name] = {"tp2": outputs(case["path"], 2, case.get("compile", False))}
        if torch.distributed.get_rank() == 0:  # the reference: eager, whole
            results[name]["tp1"] = outputs(case["path"], None)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
