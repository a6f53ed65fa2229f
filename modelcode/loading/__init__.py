"""Reading checkpoint folders into models."""

from modelcode.loading.loader import load_model, resolve_dtype

__all__ = ["load_model", "resolve_dtype"]
