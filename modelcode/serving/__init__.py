"""An OpenAI-compatible HTTP server on modelcode's engine (FastAPI), with a web chat page at /."""

from .app import create_app

__all__ = ["create_app"]
