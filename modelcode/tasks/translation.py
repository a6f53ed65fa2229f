"""Translation with Marian (opus-mt) checkpoints: their tokenizer and the `Translator` task.

A Marian folder, as the hub ships it, cuts text into pieces with two sentencepiece models, one per
language (`source.spm`, `target.spm`), but numbers the pieces with its own vocabulary (`vocab.json`,
or `target_vocab.json` too when the two sides have separate vocabularies): a piece's sentencepiece
id means nothing to the model. A source text is its pieces' vocabulary ids plus EOS; a leading
language tag such as ">>fra<<" (multilingual models) is one token, never cut.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from modelcode.errors import ArgumentError, CheckpointError
from modelcode.models.transformer import Transformer, TransformerConfig
from modelcode.tasks.seq2seq import SearchSettings, beam_search, greedy_search
from modelcode.tokenization import Tokenizer
from modelcode.tokenization.base import read_json, token_content, tokenizer_config

LANGUAGE_TAG = re.compile(r">>[^<>]+<<")


class MarianTokenizer(Tokenizer):
    """Text <-> ids for one Marian checkpoint folder, as transformers' MarianTokenizer maps them:
    `encode` reads source text (add `eos=True`, as the model expects), `decode` writes target text.

    transformers would also apply Moses punctuation normalization when `sacremoses` is installed; we
    do not (it changes only unusual punctuation such as typographic quotes).
    """

    def __init__(self, folder: Path):
        missing = [n for n in ("source.spm", "target.spm", "vocab.json") if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"no {', '.join(missing)} in {folder}: a Marian folder needs source.spm, "
                                  "target.spm and vocab.json; download them with the weights")
        config = tokenizer_config(folder)
        self.source = spm.SentencePieceProcessor(model_file=str(folder / "source.spm"))
        self.target = spm.SentencePieceProcessor(model_file=str(folder / "target.spm"))
        self.vocab: dict[str, int] = read_json(folder / "vocab.json")
        target_vocab = read_json(folder / "target_vocab.json") if config.get("separate_vocabs") else self.vocab
        self.target_pieces = {i: piece for piece, i in target_vocab.items()}
        names = [token_content(config.get(key)) or default for key, default in
                 (("unk_token", "<unk>"), ("eos_token", "</s>"), ("pad_token", "<pad>"))]
        for name in names:
            if name not in self.vocab:
                raise CheckpointError(f"special token {name!r} of {folder} is not in vocab.json")
        self.special_tokens = {name: self.vocab[name] for name in names}
        self.unk_id, self.eos_id, self.pad_id = self.special_tokens.values()
        self.add_eos, self.vocab_size = True, len(self.vocab)
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    def _encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special:
            return self._encode_plain(text)
        # re.split with a group alternates text, special token, text, ...
        parts = self._special_re.split(text)
        return [i for n, part in enumerate(parts) for i in
                ([self.special_tokens[part]] if n % 2 else self._encode_plain(part))]

    def _encode_plain(self, text: str) -> list[int]:
        tag = LANGUAGE_TAG.match(text)
        pieces = [tag.group()] if tag else []
        pieces += self.source.encode(text[tag.end():] if tag else text, out_type=str)
        return [self.vocab.get(p, self.unk_id) for p in pieces]

    def decode(self, ids: Sequence[int]) -> str:
        """Target text of `ids`, special tokens written as their text (drop them first for a translation)."""
        specials = {i: name for name, i in self.special_tokens.items()}
        text, run = "", []
        for i in ids:
            if i in specials:
                text += self.target.decode_pieces(run) + specials[i] + " "
                run = []
            else:
                run.append(self.target_pieces.get(i, specials[self.unk_id]))
        text += self.target.decode_pieces(run)
        return text.replace("\u2581", " ").strip()


def _ids(value: int | list[int] | None) -> tuple[int, ...]:
    return () if value is None else tuple(value) if isinstance(value, list) else (value,)


@dataclass
class GenerationDefaults:
    """A Marian folder's decoding settings: generation_config.json (older folders: config.json)."""

    max_length: int = 512  # decoder tokens, the start token included
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    bad_words_ids: tuple[int, ...] = ()
    forced_eos_ids: tuple[int, ...] = ()
    renormalize: bool = False

    @classmethod
    def from_folder(cls, folder: Path, config: TransformerConfig) -> "GenerationDefaults":
        c = read_json(folder / "generation_config.json") or read_json(folder / "config.json")
        bad = c.get("bad_words_ids") or []
        if any(len(words) != 1 for words in bad):
            raise CheckpointError(f"bad_words_ids {bad} in {folder}: only single-token entries are supported")
        max_length = c.get("max_length", cls.max_length)
        if c.get("max_new_tokens"):
            max_length = 1 + c["max_new_tokens"]
        return cls(max_length=max_length, num_beams=c.get("num_beams", 1),
                   length_penalty=c.get("length_penalty", 1.0), early_stopping=c.get("early_stopping", False),
                   bad_words_ids=tuple(w[0] for w in bad if w[0] != config.eos_id),  # EOS is never banned
                   forced_eos_ids=_ids(c.get("forced_eos_token_id")), renormalize=c.get("renormalize_logits", False))


@dataclass
class Translator:
    """A loaded translation model (`modelcode.load` on a Marian folder)."""

    model: Transformer
    config: TransformerConfig
    path: Path
    tokenizer: MarianTokenizer
    defaults: GenerationDefaults

    @classmethod
    def from_folder(cls, model: Transformer, config: TransformerConfig, folder: Path) -> "Translator":
        return cls(model, config, folder, MarianTokenizer(folder), GenerationDefaults.from_folder(folder, config))

    def settings(self, beams: int | None = None, max_new_tokens: int | None = None) -> SearchSettings:
        d, c = self.defaults, self.config
        max_new_tokens = min(d.max_length - 1, c.max_seq_len) if max_new_tokens is None else max_new_tokens
        if not 1 <= max_new_tokens <= c.max_seq_len:
            raise ArgumentError("max_new_tokens", f"is {max_new_tokens}, but this model has positions for 1 to "
                                f"{c.max_seq_len} target tokens")
        beams = d.num_beams if beams is None else beams
        if beams < 1:
            raise ArgumentError("beams", f"must be at least 1, got {beams}")
        return SearchSettings(max_new_tokens=max_new_tokens, eos_id=c.eos_id, pad_id=c.pad_id,
                              decoder_start_id=c.decoder_start_id, num_beams=beams, length_penalty=d.length_penalty,
                              early_stopping=d.early_stopping, bad_ids=d.bad_words_ids, forced_eos_ids=d.forced_eos_ids,
                              renormalize=d.renormalize)

    def encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> source ids (B, S), padded on the right, and their mask (B, S)."""
        ids = [self.tokenizer.encode(text, eos=True) for text in texts]
        for i, row in enumerate(ids):
            if len(row) > self.config.max_seq_len:
                raise ValueError(f"text {i} is {len(row)} tokens long, but this model has positions for "
                                 f"{self.config.max_seq_len}: split it into shorter pieces (e.g. sentences)")
        width = max(map(len, ids))
        device = self.model.lm_head.weight.device
        src = torch.tensor([row + [self.config.pad_id] * (width - len(row)) for row in ids], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=device)
        return src, mask

    def generate(self, texts: list[str], beams: int | None = None,
                 max_new_tokens: int | None = None) -> list[list[int]]:
        """Target ids of each translation, EOS included when it was reached."""
        s = self.settings(beams, max_new_tokens)
        src, mask = self.encode_batch(texts)
        return (beam_search if s.num_beams > 1 else greedy_search)(self.model, src, mask, s)

    def translate(self, texts: str | list[str], beams: int | None = None, max_new_tokens: int | None = None):
        """Translate one text (-> str) or a list of texts (-> list[str]), batched.

        beams: 1 is greedy decoding; default: the checkpoint's num_beams (4 for opus-mt).
        max_new_tokens: the longest translation in tokens; default: the checkpoint's max_length - 1.
        """
        if isinstance(texts, str):
            return self.translate([texts], beams, max_new_tokens)[0]
        if not texts:
            return []
        specials = set(self.tokenizer.special_tokens.values())  # EOS, and padding after it
        return [self.tokenizer.decode([i for i in ids if i not in specials])
                for ids in self.generate(texts, beams, max_new_tokens)]
