"""modelcode: the clearest correct code of the mainstream model architectures, fast enough to use."""

from modelcode.api import LM, load

__all__ = ["LM", "load"]
__version__ = "0.1.0"
