"""`modelcode list`: what modelcode can load without a download, and what it can load from a folder."""


def main() -> None:
    """List the embedded models, the preset shapes and the supported model_types.

    modelcode never downloads: a checkpoint is a folder on disk, e.g. from `hf download ORG/NAME --local-dir DIR`.
    """
    from modelcode.api import EMBEDDED
    from modelcode.loading import registry

    print("embedded models (pass the name as --model):")
    for name, folder in EMBEDDED.items():
        print(f"  {name:<18}{folder}")
    print("preset shapes (random weights for `bench` and `show`, or a Meta folder's params.json):")
    for name, (_, config) in registry.PRESETS.items():
        print(f"  {name:<18}{config.n_layers} layers, dim {config.dim}, vocab {config.vocab_size}")
    print("supported config.json model_types (checkpoint folders):")
    for model_type, arch in registry.ARCHITECTURES.items():
        print(f"  {model_type:<18}{arch.model.__name__}, {arch.task}")
