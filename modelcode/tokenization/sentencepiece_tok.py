"""sentencepiece backend for a protobuf `tokenizer.model` (Llama 2, Mistral)."""

import re
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path

import sentencepiece as spm

from .base import Tokenizer, token_content


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model plus the tokens that tokenizer_config.json / added_tokens.json add.

    With `parse_special`, the text between special tokens is encoded piece by piece, each piece with its own
    dummy-prefix space, as Meta's Llama 2 chat code and HF's legacy Llama tokenizer do. `decode` decodes each
    run of ordinary ids with sentencepiece (which drops the dummy-prefix space again), so
    decode(encode(text, parse_special=True)) == text.
    """

    def __init__(self, path: Path, config: dict, added: dict[str, tuple[int, bool]]):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        size = self.sp.vocab_size()
        self.special_tokens = {
            self.sp.id_to_piece(i): i for i in range(size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        for content, (i, _) in added.items():
            if i < size and self.sp.id_to_piece(i) != content:
                raise ValueError(f"added token {content!r} has id {i}, which is {self.sp.id_to_piece(i)!r} in {path}")
            self.special_tokens[content] = i
        # sentencepiece says -1 where the model has no such token.
        self.bos_id = self._config_id(config, "bos_token", self.sp.bos_id(), path)
        self.eos_id = self._config_id(config, "eos_token", self.sp.eos_id(), path)
        self.pad_id = self._config_id(config, "pad_token", self.sp.pad_id(), path)
        self.add_bos = config.get("add_bos_token", self.bos_id is not None)
        self.add_eos = config.get("add_eos_token", False)
        self._text = {i: content for content, i in self.special_tokens.items()}
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self.vocab_size = max(size, *(i + 1 for i in self._text))

    def _config_id(self, config: dict, key: str, default: int, path: Path) -> int | None:
        """Id of the token the config names under `key` (now also a special token), else `default`."""
        content = token_content(config.get(key))
        if content is None:
            return default if default >= 0 else None
        if content not in self.special_tokens:
            if self.sp.id_to_piece(i := self.sp.piece_to_id(content)) != content:  # unknown pieces get <unk>'s id
                raise ValueError(f"{key} {content!r} in the tokenizer config is not a token of {path}")
            self.special_tokens[content] = i
        return self.special_tokens[content]

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special:
            return self.sp.encode(text)
        ids: list[int] = []
        # re.split with a group alternates text, special token, text, ...
        for n, piece in enumerate(self._special_re.split(text)):
            if n % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.sp.encode(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for is_special, group in groupby(ids, key=self._text.__contains__):
            run = list(group)
            out.append("".join(self._text[i] for i in run) if is_special else self.sp.decode(run))
        return "".join(out)
