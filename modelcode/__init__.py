"""modelcode: the clearest correct code of the mainstream model architectures, fast enough to use."""

from modelcode.api import load
from modelcode.lm import LM

__all__ = ["LM", "load"]
__version__ = "0.1.0"
