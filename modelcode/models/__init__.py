"""One file per architecture; `registry.py` maps Hugging Face `model_type` names to them."""
