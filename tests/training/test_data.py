"""Fine-tuning data: records -> ids with the loss on the responses only; packing; bad input."""

import json
import subprocess
import sys

import pytest
import torch

import modelcode
from modelcode.training.data import IGNORE, collate, instruction_prompt, load_dataset, pack, render
from modelcode.training.loop import loss_sum, n_targets


@pytest.fixture(scope="module")
def lm():
    return modelcode.load("tinystories-656k", dtype=torch.float32)


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_instruction_record_masks_the_prompt_and_matches_a_hand_computed_loss(lm, tmp_path):
    record = {"instruction": "Write a story about a cat named Tom.", "output": "Tom the cat was happy."}
    path = write(tmp_path, [record])
    data = load_dataset(path, lm.tokenizer, lm.chat_format, max_len=512, val_fraction=0)
    (ex,) = data.train
    tok = lm.tokenizer
    prompt = tok.encode(instruction_prompt(record["instruction"]), bos=True)
    response = tok.encode(record["output"]) + [tok.eos_id]
    assert ex.tokens == (prompt + response)[:-1]
    assert ex.targets == [IGNORE] * (len(prompt) - 1) + response
    # By hand: the mean negative log-likelihood of the response tokens given everything before them.
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = lm.model(ids[:, :-1]).log_softmax(-1)[0]
        nll = [-logprobs[len(prompt) - 1 + k, t] for k, t in enumerate(response)]
        batch = collate([ex])
        ours = loss_sum(lm.model, batch, autocast=False) / n_targets(batch)
    torch.testing.assert_close(ours, torch.stack(nll).mean(), atol=1e-6, rtol=1e-6)


def test_instruction_with_input_uses_alpacas_second_template(lm):
    ids, trained = render({"instruction": "Say it.", "input": "hi", "output": "hi"}, 1, lm.tokenizer, lm.chat_format)
    assert lm.tokenizer.decode(ids).count("Input:\nhi") == 1 and sum(trained) == len(
        lm.tokenizer.encode("hi")) + 1


def test_chat_record_trains_on_every_assistant_turn_only(lm):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                {"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time."}]
    ids, trained = render({"messages": messages}, 1, lm.tokenizer, lm.chat_format)
    text = "".join(lm.tokenizer.decode([i]) if t else "\0" for i, t in zip(ids, trained))
    spans = [s for s in text.split("\0") if s]
    # The plain transcript's "Assistant:" and the reply's first space tokenize as one token, which is trained.
    assert spans == [": Hello there.\n\n", ": Once upon a time.\n\n<|end_story|>"]


def test_chatml_trains_the_reply_and_its_end_of_turn_not_the_header():
    from modelcode.tokenization import load_chat_format, load_tokenizer

    folder = "tests/assets/tokenizers/qwen2-tokenizer"
    tok = load_tokenizer(folder)
    chat = load_chat_format(folder, tok)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    ids, trained = render({"messages": messages}, 1, tok, chat)
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == "Hello.<|im_end|>\n"
    assert tok.decode(ids[: trained.index(True)]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_packed_examples_do_not_see_each_other(lm, tmp_path):
    records = [{"instruction": f"Write a story about a dog named {n}.", "output": f"{n} ran and ran."}
               for n in ("Tom", "Lily", "Ben")]
    data = load_dataset(write(tmp_path, records), lm.tokenizer, lm.chat_format, max_len=512, val_fraction=0)
    (row,) = pack(data.train, max_len=512)
    assert row.positions[:3] == [0, 1, 2] and row.positions.count(0) == 3
    with torch.no_grad():
        packed = lm.model(torch.tensor([row.tokens]), torch.tensor([row.positions]))[0]
        alone = torch.cat([lm.model(torch.tensor([ex.tokens]))[0] for ex in data.train])
        torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)  # float32, summed in another order
        batch = collate([row])
        separate = sum(loss_sum(lm.model, collate([ex]), False) for ex in data.train)
        torch.testing.assert_close(loss_sum(lm.model, batch, False), separate, atol=1e-4, rtol=1e-5)


def test_packing_matches_transformers_packed_position_ids(tmp_path):
    """transformers reads packed sequences from position_ids that restart; ours gives the same logits."""
    from hf_reference import tiny_hf_model

    hf = tiny_hf_model("llama3-gqa")
    hf.save_pretrained(tmp_path / "m")
    ours = modelcode.load(tmp_path / "m", dtype=torch.float32).model
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        theirs = hf(tokens, position_ids=positions, use_cache=False).logits  # without a cache, as in training
        torch.testing.assert_close(ours(tokens, positions), theirs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours(tokens[:, 5:8])[0], theirs[0, 5:8], atol=1e-4, rtol=1e-4)


def test_split_truncation_and_skipping_are_counted(lm, tmp_path):
    records = [{"instruction": "Write.", "output": "word " * n} for n in (1, 2, 3, 200, 300)]
    path = write(tmp_path, records)
    data = load_dataset(path, lm.tokenizer, lm.chat_format, max_len=100, val_fraction=0.2)
    assert (len(data.train), len(data.val), data.truncated, data.skipped) == (4, 1, 2, 0)
    assert all(len(ex.tokens) <= 100 for ex in data.train + data.val)
    data = load_dataset(path, lm.tokenizer, lm.chat_format, max_len=100, val_fraction=0, too_long="skip")
    assert (len(data.train), data.truncated, data.skipped) == (3, 0, 2)
    # A prompt longer than the context leaves no response token: skipped, and counted.
    data = load_dataset(write(tmp_path, records[:2] + [{"instruction": "go " * 300, "output": "x"}], "b.jsonl"),
                        lm.tokenizer, lm.chat_format, max_len=100, val_fraction=0)
    assert (len(data.train), data.truncated, data.skipped) == (2, 1, 1)


def test_json_list_files_are_read(lm, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}], indent=1))
    assert len(load_dataset(path, lm.tokenizer, lm.chat_format, 512, val_fraction=0).train) == 2


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "a", "output": "b"}', "{not json"], r"data.jsonl:2: not JSON"),
    ([{"instruction": "a"}], r"record 1 is neither an instruction record .* nor a chat record"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"record 1: 'messages' must be .* assistant"),
    ([], r"holds no records"),
])
def test_bad_data_says_what_is_wrong(lm, tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(write(tmp_path, lines), lm.tokenizer, lm.chat_format, 64)


def test_cli_bad_input_is_one_line_and_status_2(tmp_path):
    path = write(tmp_path, ["[oops"], name="bad.json")
    for extra, message in ((["--data", str(path)], "bad.json:1: not JSON"),
                           (["--data", str(write(tmp_path, [{"instruction": "a", "output": "b"}])),
                             "--lora-targets", "nope"], "unknown LoRA target layer(s) 'nope'")):
        run = subprocess.run([sys.executable, "-m", "modelcode.cli", "finetune", "--out", str(tmp_path / "o"), *extra],
                             capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
