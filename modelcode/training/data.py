"""Supervised fine-tuning data: JSON or JSONL records -> token ids with the loss only on the responses.

Two record shapes, as users have them:
- instruction records `{"instruction", "input" (optional), "output"}`, rendered through Alpaca's prompt
  template (`PROMPT`, below; Taori et al. 2023), the output followed by EOS;
- chat records `{"messages": [{"role", "content"}, ...]}`, rendered with the checkpoint's own chat format;
  every assistant message is trained on, everything else (system, user, the template's headers) is not.

An `Example` holds the input ids and, at each position, the id to predict there or -100 (no loss), so
examples can be padded or packed side by side without their targets moving.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from modelcode.tokenization import ChatFormat, Tokenizer

IGNORE = -100  # the target of a position without loss (PyTorch's cross_entropy ignore_index)

# Alpaca's two templates (github.com/tatsu-lab/stanford_alpaca), with and without an input.
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@dataclass
class Example:
    tokens: list[int]  # input ids
    targets: list[int]  # the next id where it is a response token, else IGNORE


def instruction_prompt(instruction: str, input: str = "") -> str:
    return PROMPT_WITH_INPUT.format(instruction=instruction, input=input) if input else \
        PROMPT.format(instruction=instruction)


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSON file (a list of objects) or a JSONL file (one object a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg}); a .json data file is one list of "
                             "records, a .jsonl file one record a line") from e
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg}); each line of a JSONL file must be one "
                                     "JSON record") from e
    if not records:
        raise ValueError(f"{path} holds no records: give instruction records ({{\"instruction\", \"output\"}}) "
                         "or chat records ({\"messages\": [...]})")
    return records


def render(record: dict, n: int, tok: Tokenizer, chat: ChatFormat) -> tuple[list[int], list[bool]]:
    """(ids, trained): a record's ids and, for each, whether it is a response token."""
    if isinstance(record, dict) and "messages" in record:
        return render_chat(_messages(record, n), chat)
    if isinstance(record, dict) and isinstance(record.get("instruction"), str) and \
            isinstance(record.get("output"), str) and isinstance(record.get("input", ""), str):
        prompt = tok.encode(instruction_prompt(record["instruction"], record.get("input", "")), bos=tok.add_bos)
        response = tok.encode(record["output"], eos=True)
        return prompt + response, [False] * len(prompt) + [True] * len(response)
    raise ValueError(f"record {n} is neither an instruction record (string fields 'instruction', 'output', "
                     f"optional 'input') nor a chat record ('messages'): {json.dumps(record)[:120]}")


def _messages(record: dict, n: int) -> list[dict]:
    messages = record["messages"]
    ok = isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                            and isinstance(m.get("content"), str) for m in messages)
    if not ok or not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"record {n}: 'messages' must be a list of {{\"role\", \"content\"}} strings with at "
                         "least one assistant message (the response to learn)")
    return messages


def render_chat(messages: list[dict], chat: ChatFormat) -> tuple[list[int], list[bool]]:
    """A dialog through the chat format; each assistant reply's tokens (its end-of-turn token included) are
    those the dialog up to it adds after the dialog before it with the generation prompt. Where a template's
    prompt ends in text that tokenizes together with the reply (a plain transcript's "Assistant:" and the
    reply's first space become ": "), that token is trained too; templates whose turns end in special tokens
    (Llama 3, ChatML, most Jinja templates) have no such token."""
    ids = chat.encode_dialog_prompt(messages, add_generation_prompt=False)
    trained = [False] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat.encode_dialog_prompt(messages[:i], add_generation_prompt=True)
        upto = chat.encode_dialog_prompt(messages[: i + 1], add_generation_prompt=False)
        start = _common_prefix(before, upto)
        for j in range(start, min(len(upto), len(ids))):
            trained[j] = True
    if ids[-1] not in chat.stop_ids and chat.tok.eos_id is not None:
        ids, trained = ids + [chat.tok.eos_id], trained + [trained[-1]]  # a plain transcript ends at EOS
    return ids, trained


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Dataset:
    train: list[Example]
    val: list[Example]
    truncated: int = 0  # examples cut to the context length
    skipped: int = 0  # examples dropped: too long with too_long="skip", or no response token left


def load_dataset(path: str | Path, tok: Tokenizer, chat: ChatFormat, max_len: int, val_fraction: float = 0.05,
                 too_long: str = "truncate", seed: int = 0) -> Dataset:
    """Read, render and split a data file; `max_len` input tokens at most per example (longer: cut to it, or
    skipped with too_long="skip"); a shuffled `val_fraction` of the records held out for validation."""
    if too_long not in ("truncate", "skip"):
        raise ValueError(f"too_long={too_long!r}: use 'truncate' or 'skip'")
    data = Dataset([], [])
    examples = []
    for n, record in enumerate(read_records(path), 1):
        ids, trained = render(record, n, tok, chat)
        if len(ids) > max_len + 1:
            if too_long == "skip":
                data.skipped += 1
                continue
            ids, trained = ids[: max_len + 1], trained[: max_len + 1]
            data.truncated += 1
        if not any(trained[1:]):
            data.skipped += 1  # nothing to learn from: the response was cut off entirely
            continue
        examples.append(Example(ids[:-1], [t if y else IGNORE for t, y in zip(ids[1:], trained[1:])]))
    if not examples:
        raise ValueError(f"{path}: no example left to train on ({data.skipped} skipped as longer than {max_len} "
                         "tokens or without a response): raise --max-len or shorten the records")
    random.Random(seed).shuffle(examples)
    n_val = round(len(examples) * val_fraction) if len(examples) > 1 else 0
    n_val = max(n_val, 1) if val_fraction > 0 and len(examples) > 1 else n_val
    data.val, data.train = examples[:n_val], examples[n_val:]
    return data


@dataclass
class PackedExample(Example):
    positions: list[int]  # each packed example's own positions, from 0


def pack(examples: list[Example], max_len: int) -> list[PackedExample]:
    """Concatenate examples, in order, into rows of at most `max_len` tokens (a new row when the next one does
    not fit). Each keeps its own positions from 0, which is what keeps them apart: attention treats a position
    that does not follow the one before it as the start of another sequence (`layers/attention.py: causal_mask`)."""
    rows: list[PackedExample] = []
    for ex in examples:
        if not rows or len(rows[-1].tokens) + len(ex.tokens) > max_len:
            rows.append(PackedExample([], [], []))
        rows[-1].tokens.extend(ex.tokens)
        rows[-1].targets.extend(ex.targets)
        rows[-1].positions.extend(range(len(ex.tokens)))
    return rows


def collate(examples: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: tokens, targets (IGNORE on padding) and positions, each (B, T)."""
    width = max(len(ex.tokens) for ex in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    positions = torch.arange(width).repeat(len(examples), 1)
    for b, ex in enumerate(examples):
        n = len(ex.tokens)
        tokens[b, :n], targets[b, :n] = torch.tensor(ex.tokens), torch.tensor(ex.targets)
        if isinstance(ex, PackedExample):
            positions[b, :n] = torch.tensor(ex.positions)
            positions[b, n:] = torch.arange(positions[b, n - 1] + 1, positions[b, n - 1] + 1 + width - n)
    return {"tokens": tokens, "targets": targets, "positions": positions}
