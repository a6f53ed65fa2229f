"""`modelcode quantize`: int8 or int4 weight-only quantization of a checkpoint, written as a new folder."""

from typing import Literal


def main(model: str, *, mode: Literal["int8", "int4"], out: str, group_size: int = 32, head: bool | None = None,
         dtype: str | None = None, device: str = "cpu", report: bool = True, text: str | None = None) -> None:
    """Quantize a checkpoint's Linear layers and write a folder `modelcode.load` opens.

    Args:
        model: checkpoint folder, or an embedded model's name (e.g. tinystories-656k).
        mode: int8 (one scale per output row) or int4 (a scale and a zero per group of inputs).
        out: the folder to write: quantized weights plus the source's config and tokenizer files.
        group_size: int4 only: inputs per group, 32, 64, 128 or 256 (smaller: more accurate, larger file).
        head: an output head not tied to the embeddings (a tied one stays): by default in int8, for int4 too
            (as llama.cpp keeps its 4-bit formats' head at 6 bits or more; int8 loses nothing measurable);
            --head: in the layers' mode (int4: smaller, less accurate); --no-head: kept as it is.
        dtype: float32, bfloat16 or float16 for the scales and the report (default: the checkpoint's own).
        device: where to quantize and run the report: cpu, cuda, ...
        report: measure perplexity and greedy agreement against the original on held-out text.
        text: held-out text for the report, paragraphs separated by blank lines (default: stories shipped
            with modelcode, in the style of TinyStories).
    """
    import modelcode
    from modelcode.quantization import quantize, save_quantized
    from modelcode.quantization.quality import quality_report, read_texts
    from modelcode.quantization.quantize import head_mode

    lm = modelcode.load(model, dtype=dtype, device=device)
    source_bytes = _bytes(lm.model)
    quantize(lm.model, mode, group_size, pack=False, head=head)
    folder = save_quantized(lm.model, lm.path, out)
    print(f"wrote {folder}: {mode}{f', group size {group_size}' if mode == 'int4' else ''}, "
          f"{_count_quantized(lm.model)} Linear layers quantized (output head: "
          f"{head_mode(lm.model) or 'not quantized'}), weights {source_bytes / 2**20:.1f} MiB -> "
          f"{_bytes(lm.model) / 2**20:.1f} MiB")
    if report:
        del lm  # compare what was written, loaded back the way users load it, with a fresh original
        texts = read_texts(text) if text else None
        print(quality_report(modelcode.load(model, dtype=dtype, device=device),
                             modelcode.load(folder, dtype=dtype, device=device), texts))


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _count_quantized(model) -> int:
    from modelcode.quantization import Int4Linear, Int8Linear

    return sum(isinstance(m, Int8Linear | Int4Linear) for m in model.modules())
