"""The Tokenizer interface shared by the tiktoken, sentencepiece and HF `tokenizers` backends, and the
tokenizer config files they all read."""

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path


class Tokenizer(ABC):
    """Text <-> token ids for one checkpoint.

    `encode` reads its text as plain text, like Meta's Llama 3 code: "<|eot_id|>" typed by a user becomes
    ordinary tokens, never the control token. `parse_special=True` turns special-token text into its id,
    as HF `tokenizer.encode` does; rendered chat templates need that. `decode` writes special tokens as
    their text, as Meta's tiktoken decode and HF's `decode(skip_special_tokens=False)` default both do.
    """

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False  # whether the checkpoint expects BOS in front of a plain prompt
    add_eos: bool = False
    special_tokens: dict[str, int]  # control tokens by their text
    vocab_size: int

    def encode(self, text: str, bos: bool = False, eos: bool = False, *, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; `bos`/`eos` add the tokenizer's BOS/EOS ids when it has them."""
        ids = self._encode(text, parse_special)
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    @abstractmethod
    def _encode(self, text: str, parse_special: bool) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a plain completion."""
        return frozenset() if self.eos_id is None else frozenset({self.eos_id})

    def token_id(self, name: str) -> int:
        """Id of the special token `name`, e.g. "<|eot_id|>"."""
        if name not in self.special_tokens:
            known = sorted(self.special_tokens, key=self.special_tokens.__getitem__)
            shown = ", ".join(known[:12]) + (f" ... ({len(known)} in all)" if len(known) > 12 else "")
            raise KeyError(f"no special token {name!r} in this tokenizer; its special tokens: {shown}")
        return self.special_tokens[name]


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when there is no such file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json, with special_tokens_map.json filling in the special tokens it lacks (as
    transformers does)."""
    config = read_json(folder / "tokenizer_config.json")
    for key, value in read_json(folder / "special_tokens_map.json").items():
        config.setdefault(key, value)
    return config


def token_content(spec: str | dict | None) -> str | None:
    """The text of a token given in a config as "<s>" or as {"content": "<s>", ...}."""
    return spec["content"] if isinstance(spec, dict) else spec


def added_tokens(folder: Path, config: dict) -> dict[str, tuple[int, bool]]:
    """Tokens added on top of a base vocabulary, as {text: (id, special)}, from tokenizer_config.json's
    added_tokens_decoder and from added_tokens.json. The latter does not say whether a token is special;
    they are control tokens in practice (Qwen2's <|im_start|>, ...), so they count as special."""
    tokens = {content: (int(i), True) for content, i in read_json(folder / "added_tokens.json").items()}
    for i, token in config.get("added_tokens_decoder", {}).items():
        tokens[token["content"]] = (int(i), token.get("special", False))
    return tokens
