"""`modelcode translate`: translate text with a Marian (opus-mt) checkpoint."""


def main(text: list[str], *, model: str, beams: int | None = None, max_new_tokens: int | None = None,
         dtype: str | None = None, device: str = "cpu") -> None:
    """Translate one or more texts (each its own argument), printing one translation per line.

    Args:
        text: the text(s) to translate; several are translated together as one batch.
        model: checkpoint folder of a translation model (e.g. a Helsinki-NLP/opus-mt-* download).
        beams: beam width; 1 is greedy decoding (default: the checkpoint's num_beams).
        max_new_tokens: the longest translation, in tokens (default: the checkpoint's max_length - 1).
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own).
        device: cpu, cuda, cuda:1, ...
    """
    import modelcode

    translator = modelcode.load(model, dtype=dtype, device=device, task="translation")
    for translation in translator.translate(list(text), beams=beams, max_new_tokens=max_new_tokens):
        print(translation)
