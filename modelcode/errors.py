"""The exceptions modelcode raises for bad input: each message says what was wrong and what to do."""


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as it is."""


class UnsupportedModelError(CheckpointError):
    """A `model_type` (or preset name) that no architecture in the registry handles."""


class ArgumentError(ValueError):
    """A bad value for one named argument. The message names it as the Python API spells it (`top_p`);
    the command line names the flag the user typed instead (`--top-p`)."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{name} {problem}")
