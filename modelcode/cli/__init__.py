"""Command-line entry points: one module per command, see `__main__.py`."""
