"""Chat formats: a list of messages -> the token ids a checkpoint was trained on. Kept apart from the
Tokenizer, as in Meta's Llama 3 code (`ChatFormat` over a plain `Tokenizer`).

A prompt starts with exactly one BOS when the tokenizer wants one (`add_bos`): the template's own, or one put
in front when the template writes none; never a second.
"""

import json
from abc import ABC, abstractmethod
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .base import Tokenizer, read_json
from .load import checkpoint_folder

Message = dict[str, str]  # {"role": "user", "content": "Hello"}


class ChatFormat(ABC):
    """Turns a dialog into prompt ids; `stop_ids` end the assistant's reply."""

    stop_ids: frozenset[int]

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.stop_ids = tok.stop_ids

    @abstractmethod
    def encode_dialog_prompt(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the dialog; `add_generation_prompt` appends the start of the assistant's turn."""

    def _bos(self) -> list[int]:
        return [self.tok.bos_id] if self.tok.add_bos and self.tok.bos_id is not None else []


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates are written against transformers' plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def compile_template(template: str) -> jinja2.Template:
    """Compile a chat template the way transformers does: sandboxed (templates come from the Hub),
    trim_blocks and lstrip_blocks, loop controls, and the helpers templates call."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class JinjaChatFormat(ChatFormat):
    """A checkpoint's Jinja chat template, rendered and tokenized like transformers' `apply_chat_template`
    (special-token text in the rendering becomes its id, nothing else is added), except that BOS is put
    in front when the tokenizer wants it and the template did not write it."""

    _REPLY = "<modelcode reply>"  # a stand-in reply, to find what the template writes after one

    def __init__(self, tok: Tokenizer, template: str):
        super().__init__(tok)
        self.template = compile_template(template)
        text = {i: content for content, i in tok.special_tokens.items()}
        ids = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
        self.variables = {name: text[i] for name, i in ids.items() if i is not None}
        self.stop_ids = tok.stop_ids | self._end_of_turn_ids()

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        # transformers drops None values (e.g. OpenAI's content=None) and always defines tools/documents.
        messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                        documents=None, **self.variables)
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, or what it reads is missing
            roles = [m.get("role") for m in messages]
            raise ValueError(f"the checkpoint's chat template rejects this conversation (roles {roles}): {e}") from e

    def encode_dialog_prompt(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        ids = self.tok.encode(self.render(messages, add_generation_prompt), parse_special=True)
        return ids if ids[:1] == [self.tok.bos_id] else self._bos() + ids

    def _end_of_turn_ids(self) -> frozenset[int]:
        """The special token the template writes after an assistant reply (<|eot_id|>, <|im_end|>, ...)."""
        dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": self._REPLY}]
        try:
            text = self.render(dialog, add_generation_prompt=False)
        except ValueError:  # a template that rejects this dialog teaches us nothing
            return frozenset()
        if self._REPLY not in text:
            return frozenset()
        after = text[text.index(self._REPLY) + len(self._REPLY) :].lstrip()
        for content in sorted(self.tok.special_tokens, key=len, reverse=True):
            if after.startswith(content):
                return frozenset({self.tok.special_tokens[content]})
        return frozenset()


class Llama3ChatFormat(ChatFormat):
    """Meta's Llama 3 format: <|begin_of_text|>, then per message a header around the role, the content
    stripped and <|eot_id|>; the generation prompt is the assistant's header."""

    def __init__(self, tok: Tokenizer):
        super().__init__(tok)
        self.stop_ids = tok.stop_ids | {tok.token_id("<|eot_id|>")}

    def _header(self, role: str) -> list[int]:
        start, end = self.tok.token_id("<|start_header_id|>"), self.tok.token_id("<|end_header_id|>")
        return [start, *self.tok.encode(role), end, *self.tok.encode("\n\n")]

    def encode_dialog_prompt(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        ids = [self.tok.token_id("<|begin_of_text|>")]
        for m in messages:
            ids += self._header(m["role"]) + self.tok.encode(m["content"].strip()) + [self.tok.token_id("<|eot_id|>")]
        if add_generation_prompt:
            ids += self._header("assistant")
        return ids


class ChatMLFormat(ChatFormat):
    """ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per message; generation prompt <|im_start|>assistant\\n.
    No default system message is inserted (Qwen2-Instruct's template adds one; its template wins when present)."""

    def __init__(self, tok: Tokenizer):
        super().__init__(tok)
        self.start, self.end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
        self.stop_ids = tok.stop_ids | {self.end}

    def encode_dialog_prompt(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        ids = self._bos()
        for m in messages:
            ids += [self.start, *self.tok.encode(f"{m['role']}\n{m['content']}"), self.end, *self.tok.encode("\n")]
        if add_generation_prompt:
            ids += [self.start, *self.tok.encode("assistant\n")]
        return ids


class PlainChatFormat(ChatFormat):
    """For base models without a template (e.g. TinyStories): a plain transcript,
    "User: Hello\\n\\nAssistant:", after BOS when the tokenizer wants it. Stops at EOS only. A message that
    starts with white space keeps it (a model's reply, written right after "Assistant:", often does), so a
    reply reads back as the model wrote it; others get one space after the colon."""

    def encode_dialog_prompt(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        text = "".join(f"{m['role'].capitalize()}:{_spaced(m['content'].rstrip())}\n\n" for m in messages)
        return self._bos() + self.tok.encode(text + ("Assistant:" if add_generation_prompt else ""))


def _spaced(text: str) -> str:
    return text if text[:1].isspace() else " " + text


def read_chat_template(folder: Path) -> str | None:
    """chat_template.jinja, or tokenizer_config.json's chat_template (a string, or a list of named
    templates of which "default" is used); None when the checkpoint has none."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = read_json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        if "default" not in named:
            raise ValueError(f"tokenizer_config.json in {folder} has chat templates {sorted(named)} but no 'default'")
        template = named["default"]
    return template


def load_chat_format(folder: str | Path, tok: Tokenizer) -> ChatFormat:
    """The chat format of a checkpoint: its Jinja template when it has one; else Meta's Llama 3 format when
    the tokenizer has Llama 3's header tokens, ChatML when it has <|im_start|>/<|im_end|>, else a plain
    transcript (PlainChatFormat)."""
    template = read_chat_template(checkpoint_folder(folder))
    if template:
        return JinjaChatFormat(tok, template)
    names = tok.special_tokens.keys()
    if {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= names:
        return Llama3ChatFormat(tok)
    if {"<|im_start|>", "<|im_end|>"} <= names:
        return ChatMLFormat(tok)
    return PlainChatFormat(tok)
