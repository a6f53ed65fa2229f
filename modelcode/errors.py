"""The exceptions modelcode raises for bad input: each message says what was wrong and what to do."""


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it is."""


class UnsupportedModelError(CheckpointError):
    """A `model_type` (or preset name) that no architecture in the registry handles."""
