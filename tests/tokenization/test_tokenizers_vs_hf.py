"""Our ids equal transformers' on the same local files: Llama 2 (sentencepiece), GPT-NeoX and TinyStories
(tokenizer.json), the Mistral chat model (tokenizer.json, and its tokenizer.model alone), Qwen2 (vocab.json)."""

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from modelcode.tokenization import load_tokenizer
from modelcode.tokenization.hf import HFTokenizer
from modelcode.tokenization.sentencepiece_tok import SentencePieceTokenizer

TEXTS = [
    "Once upon a time",
    "Hello world",
    " Hello  world ",
    "   three leading spaces",
    "trailing spaces   ",
    "\n\nnewlines\nin\n\n\nplaces\n",
    "\tTabs\tand\r\nCRLF",
    "你好，世界！这是中文。",
    "emoji 🦙🚀 and a ZWJ family 👨‍👩‍👧",
    "def f(x):\n    return {'a': x ** 2}  # code\n",
    "Ünïcödé façade — “quotes” … ½",
    "3.14159 and 1234567890",
    "",
]
# Special-token text that HF's encode turns into ids (our parse_special=True).
SPECIAL_TEXTS = {
    "llama2-tokenizer": ["<s>[INST] Hi there [/INST] Hello</s><s>[INST] Again", "a <s> b</s>"],
    "mistral-tokenizer": ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<s> x </s><unk>"],
    "gpt-neox": ["<|endoftext|>Hello<|padding|>  two spaces"],
    "tinystories-656k": ["<|start_story|>Once upon a time<|end_story|>"],
    "qwen2-tokenizer": ["<|im_start|>system\nYou are<|im_end|>\n<|endoftext|>"],
}


def hf_tokenizer(name: str, assets):
    """transformers' tokenizer over the same files; built directly where AutoTokenizer cannot be."""
    folder = assets / name
    if name == "llama2-tokenizer":
        # transformers 5 needs protobuf to convert tokenizer.model; its sentencepiece backend reads it as is.
        return SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), legacy=True, bos_token="<s>",
                                    eos_token="</s>", unk_token="<unk>")  # fmt: skip
    if name == "tinystories-656k":
        # AutoTokenizer's LlamaTokenizer in transformers 5 rebuilds the pipeline (Metaspace pre-tokenizer, no
        # <unk>) instead of using the checkpoint's tokenizer.json; see test_tinystories_auto_tokenizer.
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    if name == "qwen2-tokenizer":
        hf = Qwen2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
        hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
        return hf
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf(assets):
    return {name: hf_tokenizer(name, assets) for name in SPECIAL_TEXTS}


@pytest.mark.parametrize("name", SPECIAL_TEXTS)
@pytest.mark.parametrize("text", TEXTS)
def test_encode_equals_hf(tok, hf, name, text):
    assert tok(name).encode(text) == hf[name].encode(text, add_special_tokens=False)


@pytest.mark.parametrize(("name", "text"), [(name, text) for name, texts in SPECIAL_TEXTS.items() for text in texts])
def test_parse_special_equals_hf(tok, hf, name, text):
    ours = tok(name)
    assert ours.encode(text, parse_special=True) == hf[name].encode(text, add_special_tokens=False)
    # By default special-token text stays text (Meta's behaviour), so no control id appears.
    assert not set(ours.encode(text)) & set(ours.special_tokens.values())


@pytest.mark.parametrize("name", ["gpt-neox", "mistral-tokenizer", "tinystories-656k", "qwen2-tokenizer"])
def test_decode_equals_hf(tok, hf, name):
    ours = tok(name)
    for text in TEXTS + SPECIAL_TEXTS[name]:
        ids = ours.encode(text, bos=True, eos=True, parse_special=True)
        assert ours.decode(ids) == hf[name].decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", ["llama2-tokenizer", "gpt-neox", "qwen2-tokenizer"])
def test_decode_round_trip(tok, name):
    ours = tok(name)
    for text in TEXTS + SPECIAL_TEXTS[name]:
        assert ours.decode(ours.encode(text)) == text
        assert ours.decode(ours.encode(text, parse_special=True)) == text


def test_sentencepiece_decode_writes_special_tokens(tok):
    llama2 = tok("llama2-tokenizer")
    assert llama2.decode(llama2.encode("Hello world", bos=True, eos=True)) == "<s>Hello world</s>"


def test_tinystories_literal_and_auto_tokenizer(tok, assets):
    ours = tok("tinystories-656k")
    assert ours.encode("Once upon a time", bos=ours.add_bos) == [1, 80, 147, 201, 282, 57]
    # The prompts of the asset's reference_outputs.json, as transformers' AutoTokenizer encodes them.
    auto = AutoTokenizer.from_pretrained(assets / "tinystories-656k")
    for text, ids in [
        ("Once upon a time", [1, 80, 147, 201, 282, 57]),
        ("Tom and Lily went to the park. They saw a", [1, 80, 875, 303, 1844, 144, 261, 85]),
    ]:
        assert ours.encode(text, bos=True) == auto.encode(text) == ids


def test_mistral_without_tokenizer_json(make_folder, hf):
    """Only tokenizer.model + added_tokens.json + configs: the sentencepiece backend gives the same ids."""
    names = ["tokenizer.model", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"]
    folder = make_folder(copy={n: f"mistral-tokenizer/{n}" for n in names})
    ours = load_tokenizer(folder)
    assert isinstance(ours, SentencePieceTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos, ours.vocab_size) == (1, 32000, 2, False, 32002)
    assert ours.token_id("<|im_start|>") == 32001
    for text in TEXTS:
        assert ours.encode(text) == hf["mistral-tokenizer"].encode(text, add_special_tokens=False)
    for text in SPECIAL_TEXTS["mistral-tokenizer"]:
        assert ours.encode(text, parse_special=True) == hf["mistral-tokenizer"].encode(text, add_special_tokens=False)


def test_backend_attributes(tok):
    expected = {  # name: (backend, bos, eos, pad, add_bos, vocab_size)
        "llama2-tokenizer": (SentencePieceTokenizer, 1, 2, None, True, 32000),
        "mistral-tokenizer": (HFTokenizer, 1, 32000, 2, False, 32002),
        "tinystories-656k": (HFTokenizer, 1, 2, 0, True, 2048),
        "gpt-neox": (HFTokenizer, None, None, None, False, 50277),
        "qwen2-tokenizer": (HFTokenizer, None, None, None, False, 151646),
    }
    for name, (backend, *attributes) in expected.items():
        t = tok(name)
        assert isinstance(t, backend)
        assert [t.bos_id, t.eos_id, t.pad_id, t.add_bos, t.vocab_size] == attributes, name
        assert t.stop_ids == ({t.eos_id} if t.eos_id is not None else set())
