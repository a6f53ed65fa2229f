"""HF `tokenizers` backend: a tokenizer.json, or Qwen2's vocab.json + merges.txt."""

from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

from .base import Tokenizer, token_content

# Qwen2's pre-tokenizer; unlike Llama 3's it splits numbers into single digits (\p{N}).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen2_bpe(folder: Path, config: dict) -> RustTokenizer:
    """The byte-level BPE that Qwen2's tokenizer.json holds, rebuilt from vocab.json + merges.txt."""
    kind = config.get("tokenizer_class", "Qwen2Tokenizer")
    if kind not in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
        raise ValueError(
            f"{folder} has vocab.json + merges.txt for a {kind}, but only Qwen2's byte-level BPE is built from "
            "those files here; add the checkpoint's tokenizer.json"
        )
    tok = RustTokenizer(BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`, with BOS/EOS/pad and added tokens from tokenizer_config.json."""

    def __init__(self, tok: RustTokenizer, config: dict, added: dict[str, tuple[int, bool]]):
        for content, (i, special) in sorted(added.items(), key=lambda item: item[1][0]):
            if tok.token_to_id(content) is None:
                tok.add_tokens([AddedToken(content, special=special, normalized=not special)])
            if tok.token_to_id(content) != i:
                raise ValueError(f"added token {content!r} should have id {i}, not {tok.token_to_id(content)}")
        # A tokenizer.json may ask for fixed padding/truncation (sentence-transformers' ask for 128);
        # transformers overrides that on every call, and so do we: callers pad and check lengths themselves.
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok
        # A second copy that reads special-token text as plain text; a per-call flag would not be thread-safe.
        self._plain = RustTokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        self.special_tokens = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._config_id(config, "bos_token")
        self.eos_id = self._config_id(config, "eos_token")
        self.pad_id = self._config_id(config, "pad_token")
        # Without add_bos_token / add_eos_token in the config, the post-processor tells what HF adds.
        framed = tok.encode("", add_special_tokens=True).ids
        self.add_bos = config.get("add_bos_token", self.bos_id is not None and framed[:1] == [self.bos_id])
        self.add_eos = config.get("add_eos_token", self.eos_id is not None and framed[-1:] == [self.eos_id])

    def _config_id(self, config: dict, key: str) -> int | None:
        """Id of the token the config names under `key` (now also a special token)."""
        content = token_content(config.get(key))
        if content is None:
            return None
        if (i := self.tok.token_to_id(content)) is None:
            raise ValueError(f"{key} {content!r} in the tokenizer config is not in the vocabulary")
        self.special_tokens.setdefault(content, i)
        return i

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        return (self.tok if parse_special else self._plain).encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)
