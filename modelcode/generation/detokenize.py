"""Streaming text out of a stream of token ids, without ever splitting a character.

A token can end in the middle of a multi-byte UTF-8 character (byte-fallback and byte-level BPE
vocabularies do that for emoji and CJK), and sentencepiece drops the leading space of the first piece
it decodes. So we decode a small window that starts a few tokens back, and emit only text that has
grown and does not end in the replacement character U+FFFD of an unfinished character.
"""

from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt)
        self.read_offset = len(self.ids)  # ids up to here have been emitted as text
        self.prefix_offset = max(self.read_offset - 5, 0)  # context for decoding the next ones
        self.text = ""  # everything emitted so far

    def add(self, token: int) -> str:
        """Feed one token; returns the new text it completes ("" if none yet)."""
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end: whatever is still held back (an unfinished character decodes as U+FFFD)."""
        rest = self.tokenizer.decode(self.ids[self.prefix_offset :])[
            len(self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])) :]
        self.read_offset = self.prefix_offset = len(self.ids)
        self.text += rest
        return rest
