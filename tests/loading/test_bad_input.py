"""Bad checkpoints fail with one clear exception that names what was wrong."""

import json

import pytest
import torch
from hf_reference import tiny_hf_model

import modelcode
from modelcode.errors import CheckpointError, UnsupportedModelError


@pytest.fixture
def folder(tmp_path):
    tiny_hf_model("llama3-gqa").save_pretrained(tmp_path / "ok")
    return tmp_path / "ok"


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found: .*nowhere"):
        modelcode.load(tmp_path / "nowhere")


def test_folder_without_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*model\.safetensors.*pytorch_model\.bin"):
        modelcode.load(folder)


def test_folder_without_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json .* or params.json"):
        modelcode.load(folder)


def test_truncated_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors.*truncated"):
        modelcode.load(folder)


def test_tensor_with_wrong_shape(folder):
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' in model\.safetensors "
                                              r"has shape \(\d+, \d+\), but .* expects \(\d+, \d+\)"):
        modelcode.load(folder)


def test_unknown_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'mamba'.*supported: .*llama"):
        modelcode.load(folder)


def test_unknown_tensor(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unknown tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        modelcode.load(folder)


def test_missing_shard(folder, tmp_path):
    hf = tiny_hf_model("llama3-gqa")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shards that are not in the folder: model-00002"):
        modelcode.load(tmp_path / "sharded")


def test_unknown_dtype(folder):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        modelcode.load(folder, dtype="float8")
