"""`modelcode info`: what a checkpoint is, at a glance."""

import time


def main(model: str | None = None, *, dtype: str | None = None, device: str = "cpu") -> None:
    """Load a checkpoint and print what it is: architecture, size, dtype and load time.

    Args:
        model: checkpoint folder, or an embedded model's name (default: the embedded TinyStories-656K).
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own).
        device: cpu, cuda, cuda:1, ...
    """
    import modelcode
    from modelcode.quantization.quantize import describe_scheme, parameter_count

    start = time.perf_counter()
    lm = modelcode.load(model, dtype=dtype, device=device)
    seconds = time.perf_counter() - start
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in lm.model.parameters()})
    scheme = describe_scheme(lm.model)
    print(f"{lm.path}\n  {type(lm.model).__name__}: {parameter_count(lm.model):,} parameters, "
          f"{f'quantized {scheme}, ' if scheme else ''}{', '.join(dtypes)}, on {device}, loaded in {seconds:.2f} s")
    for field, value in vars(lm.config).items():
        print(f"  {field:<20} {value}")
