import shutil
from functools import cache
from pathlib import Path

import pytest

from modelcode.tokenization import load_tokenizer

ASSETS = Path(__file__).parents[1] / "assets" / "tokenizers"


@cache
def _load(name: str):
    return load_tokenizer(ASSETS / name)


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def tok():
    """tok("llama3-tokenizer") -> that asset's tokenizer, loaded once per session."""
    return _load


@pytest.fixture
def make_folder(tmp_path):
    """make_folder(copy={"tokenizer.model": "llama3-tokenizer/tokenizer.model"}, write={"x.json": "{}"})
    makes a fresh folder with copies of asset files (paths under tests/assets/tokenizers) and written files."""

    def make(copy: dict[str, str] | None = None, write: dict[str, str] | None = None, name: str = "ckpt") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for target, source in (copy or {}).items():
            shutil.copy(ASSETS / source, folder / target)
        for target, text in (write or {}).items():
            (folder / target).write_text(text, encoding="utf-8")
        return folder

    return make
