"""Llama 3 tiktoken tokenizer and chat format against Meta's literal ids (meta-llama/llama3 llama/test_tokenizer.py)."""

import re

import pytest

from modelcode.tokenization import Llama3ChatFormat, load_chat_format
from modelcode.tokenization.tiktoken_llama3 import MAX_RUN_CHARS, Llama3Tokenizer, split_for_tiktoken

LLAMA3 = "llama3-tokenizer"


@pytest.fixture(scope="module")
def llama3(tok):
    return tok(LLAMA3)


def test_is_tiktoken_backend(llama3):
    assert isinstance(llama3, Llama3Tokenizer)
    assert llama3.vocab_size == 128256
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id, llama3.add_bos) == (128000, 128001, None, True)


def test_special_tokens(llama3):
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003, "<|finetune_right_pad_id|>": 128004, "<|step_id|>": 128005,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
        "<|python_tag|>": 128010, "<|image|>": 128011, "<|reserved_special_token_2|>": 128012,
        "<|reserved_special_token_245|>": 128255,
    }  # fmt: skip
    assert {name: llama3.token_id(name) for name in expected} == expected
    assert len(llama3.special_tokens) == 256
    assert llama3.stop_ids == {128001, 128008, 128009}


def test_encode_meta_literal(llama3):
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert llama3.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_dialog_prompt_meta_literal(llama3, assets):
    dialog = [
        {"role": "system", "content": "This is a test sentence."},
        {"role": "user", "content": "This is a response."},
    ]
    expected = [
        128000,
        128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009,
        128006, 78191, 128007, 271,
    ]  # fmt: skip
    chat = load_chat_format(assets / LLAMA3, llama3)
    assert isinstance(chat, Llama3ChatFormat)
    assert chat.encode_dialog_prompt(dialog) == expected
    assert chat.encode_dialog_prompt(dialog, add_generation_prompt=False) == expected[:-4]
    assert chat.stop_ids == {128001, 128008, 128009}


def test_special_text_is_plain_unless_asked(llama3):
    assert 128009 not in llama3.encode("<|eot_id|>")
    assert llama3.decode(llama3.encode("<|eot_id|>")) == "<|eot_id|>"
    assert llama3.encode("a<|eot_id|>", parse_special=True) == [64, 128009]


@pytest.mark.parametrize(
    "text", ["Hello, world!", "  leading and trailing  ", "你好，世界 🦙 👨‍👩‍👧", "def f(x):\n\treturn x\n", ""]
)
def test_decode_round_trip(llama3, text):
    assert llama3.decode(llama3.encode(text)) == text


def test_long_input_round_trips(llama3):
    text = ("The quick brown fox jumps over the lazy dog. 12345 ünïcode 🦙\n" * 9_000)[:500_000]
    assert len(text) == 500_000
    assert llama3.decode(llama3.encode(text)) == text


@pytest.mark.parametrize("text", [" " * 100_000, "a" * 100_000])
def test_long_runs_round_trip(llama3, text):
    assert llama3.decode(llama3.encode(text)) == text


def test_split_like_meta():
    # Meta cuts a run every 25,000 characters, counting from the start of the run.
    text = "x" + " " * 60_000 + "y"
    assert list(split_for_tiktoken(text)) == [text[:25_001], text[25_001:50_001], text[50_001:]]
    assert list(split_for_tiktoken("short text")) == ["short text"]
    assert list(split_for_tiktoken("")) == []
    mixed = ("ab " * 10) + "z" * 70_000 + "\n" * 30_000
    pieces = list(split_for_tiktoken(mixed))
    assert "".join(pieces) == mixed
    assert max(len(run) for piece in pieces for run in re.findall(r"\s+|\S+", piece)) == MAX_RUN_CHARS
