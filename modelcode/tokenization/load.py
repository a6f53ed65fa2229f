"""Pick and build a checkpoint's tokenizer from the files in its folder (never from the folder's name)."""

from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer

from .base import Tokenizer, added_tokens, read_json, tokenizer_config
from .hf import HFTokenizer, qwen2_bpe
from .sentencepiece_tok import SentencePieceTokenizer
from .tiktoken_llama3 import Llama3Tokenizer, is_tiktoken_file

LOOKED_FOR = "tokenizer.json, vocab.json + merges.txt, or tokenizer.model"


def checkpoint_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist (or is not a folder)")
    return folder


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder. tokenizer.json wins over tokenizer.model, as in transformers;
    a tokenizer.model is tiktoken (Llama 3) or sentencepiece (Llama 2, Mistral) by its content."""
    folder = checkpoint_folder(folder)
    config = tokenizer_config(folder)
    added = added_tokens(folder, config)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer(RustTokenizer.from_file(str(folder / "tokenizer.json")), config, added)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return HFTokenizer(qwen2_bpe(folder, config), config, added)
    model = folder / "tokenizer.model"
    if model.is_file():
        if is_tiktoken_file(model):
            return Llama3Tokenizer(model)
        return SentencePieceTokenizer(model, config, added)
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise FileNotFoundError(f"no tokenizer in {str(folder)!r}: looked for {LOOKED_FOR}; found {found}")


def generation_stop_ids(folder: str | Path) -> frozenset[int]:
    """The `eos_token_id` (an int or a list) of the folder's generation_config.json; empty without one."""
    eos = read_json(checkpoint_folder(folder) / "generation_config.json").get("eos_token_id")
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
