"""Our ids equal the ids Hugging Face produced for llama.cpp's 46 test strings (tokenizer-test-vectors/README.md).
The bert-bge vectors are kept for the BERT tokenizer and not checked here."""

from pathlib import Path

import pytest

VECTORS = Path(__file__).parents[1] / "assets" / "tokenizers" / "tokenizer-test-vectors"
CASES = {"llama-spm": "llama2-tokenizer", "llama-bpe": "llama3-tokenizer", "qwen2": "qwen2-tokenizer"}


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    texts = (VECTORS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (VECTORS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(texts[:-1]) == len(ids) == 46 and texts[-1] == ""
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts[:-1], ids, strict=True)]


PARAMS = [
    pytest.param(asset, text, ids, id=f"{name}-{n}")
    for name, asset in CASES.items()
    for n, (text, ids) in enumerate(read_vectors(name))
]


@pytest.mark.parametrize(("asset", "text", "ids"), PARAMS)
def test_vector(tok, asset, text, ids):
    assert tok(asset).encode(text) == ids
