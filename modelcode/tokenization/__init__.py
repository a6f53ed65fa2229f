"""One Tokenizer interface over tiktoken (Llama 3), sentencepiece (Llama 2, Mistral) and HF `tokenizers`
(tokenizer.json, Qwen2's vocab.json + merges.txt), chosen from a checkpoint folder's files; chat formats
(Jinja templates, Llama 3, ChatML, plain) kept apart from tokenization."""

from .base import Tokenizer
from .chat import (
    ChatFormat,
    ChatMLFormat,
    JinjaChatFormat,
    Llama3ChatFormat,
    PlainChatFormat,
    load_chat_format,
    read_chat_template,
)
from .load import generation_stop_ids, load_tokenizer

__all__ = [
    "ChatFormat",
    "ChatMLFormat",
    "JinjaChatFormat",
    "Llama3ChatFormat",
    "PlainChatFormat",
    "Tokenizer",
    "generation_stop_ids",
    "load_chat_format",
    "load_tokenizer",
    "read_chat_template",
]
