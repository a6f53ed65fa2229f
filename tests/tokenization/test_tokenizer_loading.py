"""The backend is chosen from the files' content, never the folder's name; clear errors; generation stop ids."""

import json

import pytest

from modelcode.tokenization import generation_stop_ids, load_tokenizer
from modelcode.tokenization.hf import HFTokenizer
from modelcode.tokenization.sentencepiece_tok import SentencePieceTokenizer
from modelcode.tokenization.tiktoken_llama3 import Llama3Tokenizer


def test_tokenizer_model_kind_is_read_from_content(make_folder):
    # Misleading folder names on purpose.
    tiktoken = make_folder(copy={"tokenizer.model": "llama3-tokenizer/tokenizer.model"}, name="Llama-2-7b")
    spm = make_folder(copy={"tokenizer.model": "llama2-tokenizer/tokenizer.model"}, name="Meta-Llama-3-8B")
    assert isinstance(load_tokenizer(tiktoken), Llama3Tokenizer)
    assert isinstance(load_tokenizer(str(spm)), SentencePieceTokenizer)


def test_tokenizer_json_wins_over_tokenizer_model(tok):
    assert isinstance(tok("mistral-tokenizer"), HFTokenizer)  # the folder has both


def test_vocab_and_merges_need_a_known_class(make_folder):
    files = {name: f"qwen2-tokenizer/{name}" for name in ("vocab.json", "merges.txt")}
    folder = make_folder(copy=files, write={"tokenizer_config.json": '{"tokenizer_class": "GPT2Tokenizer"}'})
    with pytest.raises(ValueError, match="GPT2Tokenizer.*tokenizer.json"):
        load_tokenizer(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        load_tokenizer(tmp_path / "no-such-checkpoint")


def test_folder_without_tokenizer(make_folder):
    folder = make_folder(write={"config.json": "{}"}, name="weights-only")
    with pytest.raises(FileNotFoundError) as error:
        load_tokenizer(folder)
    message = str(error.value)
    assert "weights-only" in message and "config.json" in message
    assert all(name in message for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model"))


def test_unknown_special_token(tok):
    with pytest.raises(KeyError, match=r"<\|eot_id\|>.*<\|start_story\|>"):
        tok("tinystories-656k").token_id("<|eot_id|>")
    assert tok("qwen2-tokenizer").token_id("<|im_end|>") == 151645


def test_added_token_with_wrong_id(make_folder):
    files = {name: f"qwen2-tokenizer/{name}" for name in ("vocab.json", "merges.txt")}
    folder = make_folder(copy=files, write={"added_tokens.json": '{"<|im_start|>": 7}'})
    with pytest.raises(ValueError, match=r"<\|im_start\|>.*7"):
        load_tokenizer(folder)


def test_generation_stop_ids(assets, make_folder):
    assert generation_stop_ids(assets / "tinystories-656k") == {2}
    assert generation_stop_ids(assets / "mistral-tokenizer") == {32000}
    llama31 = make_folder(write={"generation_config.json": json.dumps({"eos_token_id": [128001, 128008, 128009]})})
    assert generation_stop_ids(llama31) == {128001, 128008, 128009}
    assert generation_stop_ids(assets / "gpt-neox") == frozenset()
