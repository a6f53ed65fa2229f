"""Marian (the 2017 Transformer as opus-mt ships it) equals transformers' MarianMTModel: logits on a
padded batch, the tokenizer's ids and text, greedy and beam-search translations token for token."""

import copy
import json
import shutil
import warnings

import pytest
import torch
from cli_helpers import cli_error
from marian_reference import DE, EN, VARIANTS, hf_tokenizer, marian_folder, one_thread

import modelcode
from modelcode.cli.__main__ import main as cli
from modelcode.errors import CheckpointError, UnsupportedModelError
from modelcode.tasks.translation import Translator

warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")
# Sentences the tiny model was trained on (it ends them with EOS), and new ones (it rambles on).
TEXTS = [EN[0], EN[1], EN[2], "a dog is good", "where is my coffee", "the lazy frog reads a book",
         "my teacher is sunny", "bus"]


def hf_ids(generated: torch.Tensor, pad_id: int, eos_id: int) -> list[list[int]]:
    """transformers' output rows -> our form: without the start token, up to EOS or the padding."""
    rows = []
    for row in generated[:, 1:].tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else [t for t in row if t != pad_id])
    return rows


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("marian")
    return folder, marian_folder(folder, train_steps=40)


@pytest.fixture(scope="module")
def translator(trained):
    return modelcode.load(trained[0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(variant, tmp_path):
    hf = marian_folder(tmp_path, variant)
    ours = modelcode.load(tmp_path, dtype=torch.float32)
    assert isinstance(ours, Translator)
    src, mask = ours.encode_batch(TEXTS[:4])  # a padded batch: the texts differ in length
    assert (mask == 0).any()
    g = torch.Generator().manual_seed(0)
    tgt = torch.randint(0, hf.config.decoder_vocab_size - 1, (4, 9), generator=g)
    tgt[:, 0] = hf.config.decoder_start_token_id
    with torch.no_grad():
        expected = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        actual = ours.model(src, tgt, mask)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_config_reaches_the_model(tmp_path):
    marian_folder(tmp_path / "s", "separate-vocabs")
    marian_folder(tmp_path / "o")
    separate = modelcode.load(tmp_path / "s").model
    assert separate.encoder.embed_tokens is not separate.decoder.embed_tokens
    assert separate.lm_head.weight is separate.decoder.embed_tokens.weight
    shared = modelcode.load(tmp_path / "o").model
    assert shared.encoder.embed_tokens is shared.decoder.embed_tokens
    assert shared.lm_head.weight is shared.encoder.embed_tokens.weight
    assert shared.encoder.embed_scale == 8.0 and shared.encoder.layers[0].act is torch.nn.functional.silu
    # Marian's sinusoids: all sines, then all cosines.
    table = shared.encoder.embed_positions.table
    torch.testing.assert_close(table[3, :32], torch.sin(3 * 10000 ** (-torch.arange(0, 64, 2) / 64)))
    torch.testing.assert_close(table[3, 32:], torch.cos(3 * 10000 ** (-torch.arange(0, 64, 2) / 64)))


@pytest.mark.parametrize("variant", ["opus-mt", "separate-vocabs"])
def test_tokenizer_equals_transformers(variant, tmp_path):
    marian_folder(tmp_path, variant)
    hf, ours = hf_tokenizer(tmp_path), modelcode.load(tmp_path).tokenizer
    texts = [*EN[:3], ">>deu<< where is the dog", "Zürich costs 5½ €", "", "  two  spaces "]
    assert [ours.encode(t, eos=True) for t in texts] == hf(texts).input_ids
    assert ours.encode(">>deu<< a dog")[0] == hf.encoder[">>deu<<"]
    special = "the dog </s> is<pad>good <unk> x"  # transformers reads special-token text as the token
    assert ours.encode(special, eos=True, parse_special=True) == hf(special).input_ids
    assert ours.encode(special).count(ours.eos_id) == 0  # plain text stays plain
    g = torch.Generator().manual_seed(1)
    n_target = len(json.loads((tmp_path / ("vocab.json" if variant == "opus-mt" else "target_vocab.json")).read_text()))
    for _ in range(20):
        ids = torch.randint(0, n_target, (12,), generator=g).tolist()
        ids[3:5] = [ours.eos_id, ours.pad_id]
        assert ours.decode(ids) == hf.decode(ids, use_source_tokenizer=False)
        kept = [i for i in ids if i not in ours.special_tokens.values()]
        assert ours.decode(kept) == hf.decode(ids, skip_special_tokens=True, use_source_tokenizer=False)


def test_greedy_equals_transformers(trained, translator):
    folder, hf = trained
    batch = hf_tokenizer(folder)(TEXTS, return_tensors="pt", padding=True)
    for max_new_tokens in (8, 30):
        with torch.no_grad():
            expected = hf.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        actual = translator.generate(TEXTS, beams=1, max_new_tokens=max_new_tokens)
        assert actual == hf_ids(expected, hf.config.pad_token_id, hf.config.eos_token_id)
    # Not a degenerate model: the translations differ, some end with EOS early and some run to the end.
    assert len({tuple(a) for a in actual}) == len(TEXTS)
    assert any(a[-1] == 0 and len(a) < 30 for a in actual) and any(len(a) == 30 for a in actual)


GENERATION_SETTINGS = {
    "opus-mt": {},  # its generation_config.json: num_beams 4, length_penalty 1, early_stopping False
    "short-penalty-early-stop": dict(length_penalty=0.6, early_stopping=True),
    "long-penalty-never": dict(length_penalty=2.0, early_stopping="never"),
    "negative-penalty": dict(length_penalty=-1.0),
    "renormalized-3-beams": dict(renormalize_logits=True, num_beams=3),
}


@pytest.mark.parametrize("name", list(GENERATION_SETTINGS))
def test_beam_search_equals_transformers(name, trained, tmp_path):
    folder, hf = trained
    settings = GENERATION_SETTINGS[name]
    shutil.copytree(folder, tmp_path / "m")
    config = json.loads((folder / "generation_config.json").read_text())
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**config, **settings}))
    translator = modelcode.load(tmp_path / "m")
    batch = hf_tokenizer(folder)(TEXTS, return_tensors="pt", padding=True)
    for max_new_tokens in (8, 30):
        with torch.no_grad():
            expected = hf.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                   **{"num_beams": 4, **settings})
        actual = translator.generate(TEXTS, max_new_tokens=max_new_tokens)  # beams from generation_config.json
        assert actual == hf_ids(expected, hf.config.pad_token_id, hf.config.eos_token_id)


@pytest.mark.parametrize("renormalize", [False, True])
def test_banned_token_as_transformers(renormalize, trained, tmp_path):
    """With the pad token made likely, banning it (bad_words_ids) and renormalizing the scores after the
    ban both change the result; they must change it as in transformers."""
    folder, hf = trained
    hf = copy.deepcopy(hf)
    pad = hf.config.pad_token_id
    with torch.no_grad():
        hf.final_logits_bias[0, pad] += 6.0
    hf.generation_config.renormalize_logits = renormalize
    hf.save_pretrained(tmp_path)
    for name in ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    translator = modelcode.load(tmp_path)
    batch = hf_tokenizer(folder)(TEXTS, return_tensors="pt", padding=True)
    for beams in (1, 4):
        with torch.no_grad():
            expected = hf.generate(**batch, do_sample=False, num_beams=beams, max_new_tokens=20)
        assert translator.generate(TEXTS, beams=beams, max_new_tokens=20) == hf_ids(expected, pad, 0)
    translator.defaults.bad_words_ids = ()
    assert any(pad in ids for ids in translator.generate(TEXTS, beams=1, max_new_tokens=20))  # the ban matters


def test_beam_search_differs_from_greedy(translator):
    """Beam search is really searching: on some text it finds a translation greedy decoding misses."""
    assert translator.generate(TEXTS, beams=4, max_new_tokens=30) != translator.generate(TEXTS, beams=1,
                                                                                         max_new_tokens=30)


def test_cached_decoding_equals_full_decoding(translator):
    """The decoder's KV cache (and the cross-attention keys/values computed once) change nothing."""
    model = translator.model
    src, mask = translator.encode_batch(TEXTS[:3])
    tgt = torch.tensor([[model.config.decoder_start_id, *ids[:6]] for ids in
                        translator.generate(TEXTS[:3], beams=1, max_new_tokens=12)])
    with torch.no_grad():
        memory = model.encode(src, mask)
        full = model.decode(tgt, memory, mask)
        cache = model.new_cache()
        steps = [model.decode(tgt[:, t:t + 1], memory, mask, torch.full((3, 1), t), cache) for t in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_translate_gives_transformers_text(trained, translator):
    folder, hf = trained
    tokenizer = hf_tokenizer(folder)
    with torch.no_grad():
        expected = hf.generate(**tokenizer(TEXTS, return_tensors="pt", padding=True))  # generation_config defaults
    texts = tokenizer.batch_decode(expected, skip_special_tokens=True, use_source_tokenizer=False)
    assert translator.translate(TEXTS) == texts
    assert translator.translate(EN[3]) == DE[3]  # a sentence it learned, as a single string
    assert translator.translate([]) == []


def test_bfloat16(trained):
    translator = modelcode.load(trained[0], dtype="bfloat16")
    assert translator.model.lm_head.weight.dtype == torch.bfloat16
    assert isinstance(translator.translate(EN[0], beams=2, max_new_tokens=6), str)


def test_text_too_long(translator):
    with pytest.raises(ValueError, match=r"text 1 is \d+ tokens long, but this model has positions for 48: split it"):
        translator.translate(["a dog", " ".join(EN)])


def test_max_new_tokens_out_of_range(translator):
    with pytest.raises(ValueError, match="max_new_tokens is 49, but this model has positions for 1 to 48 target"):
        translator.translate("a dog", max_new_tokens=49)


def test_missing_vocabulary(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "m", ignore=shutil.ignore_patterns("target.spm"))
    with pytest.raises(CheckpointError, match=r"no target\.spm in .*: a Marian folder needs source\.spm, target\.spm"):
        modelcode.load(tmp_path / "m")


def test_pre_layer_norm_config_is_refused(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "normalize_before": True}))
    with pytest.raises(UnsupportedModelError, match="normalize_before=True; Marian .* use normalize_before=False"):
        modelcode.load(tmp_path / "m")


def test_cli_translate(trained, translator, capsys):
    cli(["translate", EN[3], "a dog is good", "--model", str(trained[0]), "--beams", "1", "--max-new-tokens", "20"])
    assert capsys.readouterr().out.splitlines() == translator.translate([EN[3], "a dog is good"], beams=1,
                                                                         max_new_tokens=20)


def test_cli_translate_too_long(trained, capsys):
    cli_error(["translate", " ".join(EN), "--model", str(trained[0])], capsys,
              "modelcode translate: error: text 0 is .* tokens long")
