"""Reading checkpoint folders into models: one builder (`build`), one loader (`load_model`)."""

from modelcode.loading.build import Built, build, resolve_dtype
from modelcode.loading.loader import load_model

__all__ = ["Built", "build", "load_model", "resolve_dtype"]
