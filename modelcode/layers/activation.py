"""The GELU activation by its Hugging Face `hidden_act` name (GPT-NeoX and BERT use it)."""

from torch import nn

# HF name -> torch's `approximate`: "gelu" is the exact erf form (Hendrycks & Gimpel 2016); the others
# are the tanh approximation, which GPT-2-era code wrote out by hand under several names.
GELU_KINDS = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}


def gelu(hidden_act: str) -> nn.GELU:
    if hidden_act not in GELU_KINDS:
        raise ValueError(f"hidden_act={hidden_act!r} is not supported here: use one of {', '.join(GELU_KINDS)}")
    return nn.GELU(approximate=GELU_KINDS[hidden_act])
