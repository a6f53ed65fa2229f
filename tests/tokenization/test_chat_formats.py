"""Chat formats: Jinja templates give transformers' `apply_chat_template` ids; Llama 3, ChatML and plain fallbacks."""

import json

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from modelcode.tokenization import (
    ChatMLFormat,
    JinjaChatFormat,
    Llama3ChatFormat,
    PlainChatFormat,
    load_chat_format,
    load_tokenizer,
)
from modelcode.tokenization.tiktoken_llama3 import PATTERN, SPECIAL_TOKENS

DIALOGS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "Answer briefly.  "},
        {"role": "user", "content": " What is 2+2?\n"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 你好 🦙?"},
    ],
]
# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# A template in the style of base-model fine-tunes; it writes BOS itself and ends assistant turns with " " + EOS
# (TinyStories' added tokens are `normalized`, so its tokenizer.json only finds them after a space).
STORY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] | trim }}"
    "{% if m['role'] == 'assistant' %}{{ ' ' + eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def hf_ids(hf, dialog, add_generation_prompt=True) -> list[int]:
    out = hf.apply_chat_template(dialog, add_generation_prompt=add_generation_prompt, tokenize=True)
    return out["input_ids"]


def story_folder(make_folder, assets, template, name="ckpt"):
    """The TinyStories tokenizer files, with `template` in its tokenizer_config.json."""
    config = json.loads((assets / "tinystories-656k" / "tokenizer_config.json").read_text())
    return make_folder(
        copy={"tokenizer.json": "tinystories-656k/tokenizer.json"},
        write={"tokenizer_config.json": json.dumps({**config, "chat_template": template})},
        name=name,
    )


@pytest.fixture(scope="module")
def hf_llama3(assets):
    converted = TikTokenConverter(
        vocab_file=str(assets / "llama3-tokenizer" / "tokenizer.model"), pattern=PATTERN,
        extra_special_tokens=SPECIAL_TOKENS,
    ).converted()  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=converted, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        chat_template=LLAMA3_TEMPLATE,
    )  # fmt: skip


@pytest.mark.parametrize("dialog", DIALOGS)
def test_llama3_template_equals_hf_and_meta(make_folder, hf_llama3, dialog):
    folder = make_folder(
        copy={"tokenizer.model": "llama3-tokenizer/tokenizer.model"},
        write={"tokenizer_config.json": json.dumps({"chat_template": LLAMA3_TEMPLATE})},
    )
    tok = load_tokenizer(folder)
    chat = load_chat_format(folder, tok)
    assert isinstance(chat, JinjaChatFormat)
    for gen in (True, False):
        ids = chat.encode_dialog_prompt(dialog, add_generation_prompt=gen)
        assert ids == hf_ids(hf_llama3, dialog, gen)
        assert ids == Llama3ChatFormat(tok).encode_dialog_prompt(dialog, add_generation_prompt=gen)
    assert chat.stop_ids == {128001, 128008, 128009}


def test_mistral_chatml_golden(tok, assets):
    chat = load_chat_format(assets / "mistral-tokenizer", tok("mistral-tokenizer"))
    assert isinstance(chat, JinjaChatFormat)
    golden = [32001, 1587, 13, 1976, 460, 264, 10865, 13892, 28723, 32000, 28705, 13, 32001, 2188, 13, 16230, 32000,
              28705, 13, 32001, 13892, 13]  # fmt: skip
    assert chat.encode_dialog_prompt(DIALOGS[1]) == golden
    assert chat.stop_ids == {32000}


@pytest.mark.parametrize("dialog", DIALOGS)
def test_mistral_chatml_equals_hf(tok, assets, dialog):
    hf = AutoTokenizer.from_pretrained(assets / "mistral-tokenizer")
    chat = load_chat_format(assets / "mistral-tokenizer", tok("mistral-tokenizer"))
    for gen in (True, False):
        assert chat.encode_dialog_prompt(dialog, add_generation_prompt=gen) == hf_ids(hf, dialog, gen)


@pytest.mark.parametrize("dialog", DIALOGS)
def test_tinystories_template_equals_hf(make_folder, assets, dialog):
    folder = story_folder(make_folder, assets, STORY_TEMPLATE)
    tok = load_tokenizer(folder)
    chat = load_chat_format(folder, tok)
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token="<|start_story|>", eos_token="<|end_story|>",
        chat_template=STORY_TEMPLATE,
    )  # fmt: skip
    for gen in (True, False):
        ids = chat.encode_dialog_prompt(dialog, add_generation_prompt=gen)
        assert ids == hf_ids(hf, dialog, gen)
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
        assert ids.count(tok.eos_id) == sum(m["role"] == "assistant" for m in dialog)
    assert chat.stop_ids == {tok.eos_id}


def test_bos_added_once_when_template_lacks_it(make_folder, assets):
    template = STORY_TEMPLATE.removeprefix("{{ bos_token }}")
    folder = story_folder(make_folder, assets, template)
    tok = load_tokenizer(folder)
    ids = load_chat_format(folder, tok).encode_dialog_prompt(DIALOGS[0])
    assert ids == [tok.bos_id] + tok.encode("USER: Hello\nASSISTANT:")


def test_qwen2_chatml_fallback_equals_hf(tok, assets):
    qwen2 = tok("qwen2-tokenizer")
    chat = load_chat_format(assets / "qwen2-tokenizer", qwen2)
    assert isinstance(chat, ChatMLFormat)
    assert chat.stop_ids == {151645}
    mistral_config = json.loads((assets / "mistral-tokenizer" / "tokenizer_config.json").read_text())
    hf = Qwen2Tokenizer(
        vocab=str(assets / "qwen2-tokenizer" / "vocab.json"), merges=str(assets / "qwen2-tokenizer" / "merges.txt"),
        chat_template=mistral_config["chat_template"],  # plain ChatML
    )  # fmt: skip
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    for dialog in DIALOGS:
        for gen in (True, False):
            assert chat.encode_dialog_prompt(dialog, add_generation_prompt=gen) == hf_ids(hf, dialog, gen)


def test_plain_fallback(tok, assets):
    tinystories = tok("tinystories-656k")
    chat = load_chat_format(assets / "tinystories-656k", tinystories)
    assert isinstance(chat, PlainChatFormat)
    ids = chat.encode_dialog_prompt(DIALOGS[1])
    assert ids == tinystories.encode("System: You are a helpful assistant.\n\nUser: Hello\n\nAssistant:", bos=True)
    assert chat.stop_ids == {2}
    gpt_neox = tok("gpt-neox")  # no BOS wanted, none added
    assert load_chat_format(assets / "gpt-neox", gpt_neox).encode_dialog_prompt(DIALOGS[0]) == gpt_neox.encode(
        "User: Hello\n\nAssistant:"
    )


def test_end_of_turn_found_in_template(make_folder):
    # Llama 2's template closes an assistant turn with " </s>"; a template may also end turns with other tokens.
    llama2_style = "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"  # noqa: E501
    folder = make_folder(
        copy={"tokenizer.model": "llama2-tokenizer/tokenizer.model"},
        write={"tokenizer_config.json": json.dumps({"chat_template": llama2_style})},
    )
    tok = load_tokenizer(folder)
    chat = load_chat_format(folder, tok)
    assert chat.stop_ids == {2}
    ids = chat.encode_dialog_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert ids == [1, *tok.encode("[INST] Hi [/INST] Yo "), 2]


def test_named_templates_and_jinja_file(make_folder, assets):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0]['content'] }}"}]
    folder = story_folder(make_folder, assets, named)
    tok = load_tokenizer(folder)
    assert load_chat_format(folder, tok).encode_dialog_prompt(DIALOGS[0]) == tok.encode("Hello", bos=True)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert load_chat_format(folder, tok).encode_dialog_prompt(DIALOGS[0]) == tok.encode("HELLO", bos=True)


def test_template_helpers_and_errors(make_folder, assets):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
        "{{ messages | tojson }} {{ strftime_now('%Y') | length }}"
    )
    folder = story_folder(make_folder, assets, template)
    chat = load_chat_format(folder, load_tokenizer(folder))
    assert chat.render([{"role": "user", "content": "é<"}]) == '[{"role": "user", "content": "é<"}] 4'
    with pytest.raises(ValueError, match=r"chat template rejects this conversation \(roles \['assistant'\]\): first "
                                         "message must be from the user"):
        chat.encode_dialog_prompt([{"role": "assistant", "content": "Hi"}])
    bad = story_folder(make_folder, assets, [{"name": "rag", "template": "x"}], name="bad")
    with pytest.raises(ValueError, match="no 'default'"):
        load_chat_format(bad, load_tokenizer(bad))
