"""One file per architecture (`loading/registry.py` maps Hugging Face `model_type` names to them)."""
