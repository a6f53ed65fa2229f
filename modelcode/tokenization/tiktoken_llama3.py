"""Meta's Llama 3 tokenizer: tiktoken BPE over a `tokenizer.model` of `<base64 token> <rank>` lines.

Follows meta-llama/llama3 `llama/tokenizer.py`, with the special-token names of meta-llama/llama-models
(Llama 3.1 and later; the ids that matter, BOS/EOS/headers/<|eot_id|>, are the same for Llama 3.0).
"""

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from .base import Tokenizer

PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BASE_TOKENS = 128_000
NUM_SPECIAL_TOKENS = 256
_NAMED = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]  # fmt: skip
SPECIAL_TOKENS = _NAMED + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED))]

# tiktoken's regex overflows its stack on very long inputs and on long runs of whitespace or of
# non-whitespace (openai/tiktoken#195), so Meta cuts the text first; the cuts fall only inside such runs.
MAX_CHUNK_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")  # \s is exactly str.isspace(), which Meta's cutting loop uses


def is_tiktoken_file(path: Path) -> bool:
    """True for a tiktoken BPE file (text lines `<base64> <rank>`); a sentencepiece model is a protobuf."""
    with open(path, "rb") as f:
        first_line = f.readline(1024)
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?\n?", first_line) is not None


def split_for_tiktoken(text: str) -> Iterator[str]:
    """Meta's cutting: 400,000-character chunks, then each run of whitespace or of non-whitespace cut
    every 25,000 characters."""
    for start in range(0, len(text), MAX_CHUNK_CHARS):
        chunk = text[start : start + MAX_CHUNK_CHARS]
        cut = 0
        for run in _RUNS.finditer(chunk):
            for at in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[cut:at]
                cut = at
        yield chunk[cut:]


class Llama3Tokenizer(Tokenizer):
    """tiktoken with Meta's pre-tokenizer regex and 256 special tokens numbered from 128000."""

    def __init__(self, path: Path):
        ranks = load_tiktoken_bpe(str(path))
        if len(ranks) != NUM_BASE_TOKENS:
            raise ValueError(
                f"{path} is a tiktoken file with {len(ranks):,} tokens, but only Llama 3's {NUM_BASE_TOKENS:,}-token "
                "tokenizer.model is known here; add a tokenizer.json next to it instead"
            )
        self.special_tokens = {name: NUM_BASE_TOKENS + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=path.name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = self.model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.add_bos = True

    @property
    def stop_ids(self) -> frozenset[int]:
        """Meta's stop tokens: end of text, end of message (tool call) and end of turn."""
        return frozenset(self.special_tokens[n] for n in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        # disallowed_special=() reads special-token text as plain text instead of raising.
        allowed = "all" if parse_special else set()
        ids: list[int] = []
        for piece in split_for_tiktoken(text):
            ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))
