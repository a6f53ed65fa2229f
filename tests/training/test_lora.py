"""LoRA applied from outside: exact where it must be, and interoperable with peft and transformers."""

import json

import peft
import pytest
import torch
import transformers
from hf_reference import random_prompts, tiny_hf_model

import modelcode
from modelcode.errors import CheckpointError
from modelcode.loading.save import save_checkpoint
from modelcode.loading.weight_maps import llama as llama_maps
from modelcode.quantization import Int8Linear, quantize
from modelcode.training import LoRAConfig, apply_lora, merge_lora, save_adapter
from modelcode.training.lora import LoRALinear, lora_layers

HF_MAP = llama_maps.HF


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random Llama 3 (GQA, untied head) saved as transformers saves it."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama3-gqa").save_pretrained(folder)
    return folder


def load(folder) -> torch.nn.Module:
    return modelcode.load(folder, dtype=torch.float32).model


def randomize_adapters(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_zero_b_keeps_the_base_logits_and_only_adapters_train(hf_folder):
    base, model = load(hf_folder), load(hf_folder)
    names = apply_lora(model, LoRAConfig(), HF_MAP)
    assert names == ["layers.0.attention.wq", "layers.0.attention.wv", "layers.1.attention.wq",
                     "layers.1.attention.wv"]
    tokens = random_prompts(128)
    assert torch.equal(model.eval()(tokens), base(tokens))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{n}.lora_{x}" for n in names for x in "AB"}


def test_all_targets_and_model_names(hf_folder):
    model = load(hf_folder)
    assert len(apply_lora(model, LoRAConfig(targets=("all",)), HF_MAP)) == 2 * 7  # q k v o gate up down
    model = load(hf_folder)
    assert apply_lora(model, LoRAConfig(targets=("w1", "down_proj")), HF_MAP) == [
        "layers.0.feed_forward.w1", "layers.0.feed_forward.w2", "layers.1.feed_forward.w1", "layers.1.feed_forward.w2"]


def test_unknown_target_is_named(hf_folder):
    with pytest.raises(ValueError, match=r"unknown LoRA target layer\(s\) 'qkv_proj'.*q_proj"):
        apply_lora(load(hf_folder), LoRAConfig(targets=("q_proj", "qkv_proj")), HF_MAP)


def test_merged_equals_unmerged(hf_folder):
    model = load(hf_folder)
    apply_lora(model, LoRAConfig(targets=("all",), dropout=0.1), HF_MAP)
    randomize_adapters(model)
    tokens = random_prompts(128)
    model.eval()
    with torch.no_grad():
        unmerged = model(tokens)
        merge_lora(model)
        assert not lora_layers(model)
        torch.testing.assert_close(model(tokens), unmerged, atol=1e-5, rtol=1e-5)


def peft_model(folder, adapter=None, config: LoRAConfig | None = None):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        return peft.PeftModel.from_pretrained(hf, adapter).eval()
    c = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=list(config.targets),
                        lora_dropout=0.0, init_lora_weights=False)  # random A and B: nothing hides
    torch.manual_seed(3)
    return peft.get_peft_model(hf, c).eval()


def test_our_adapter_in_peft_gives_our_merged_logits(hf_folder, tmp_path):
    model = load(hf_folder)
    config = LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    apply_lora(model, config, HF_MAP)
    randomize_adapters(model)
    save_adapter(model, config, HF_MAP, tmp_path / "adapter", base_model=str(hf_folder))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    tokens = random_prompts(128)
    with torch.no_grad():
        ours = merge_lora(model).eval()(tokens)
        theirs = peft_model(hf_folder, tmp_path / "adapter")(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_peft_adapter_loaded_by_us_gives_peft_logits(hf_folder, tmp_path):
    for use_rslora in (False, True):
        config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"],
                                 init_lora_weights=False, use_rslora=use_rslora)
        torch.manual_seed(3)
        pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(hf_folder), config).eval()
        pm.save_pretrained(tmp_path / f"peft-{use_rslora}")
        tokens = random_prompts(128)
        with torch.no_grad():
            theirs = pm(tokens).logits
            lm = modelcode.load(hf_folder, dtype=torch.float32, adapter=tmp_path / f"peft-{use_rslora}")
            assert not lora_layers(lm.model)  # merged on load
            torch.testing.assert_close(lm.model(tokens), theirs, atol=1e-4, rtol=1e-4)


def test_merged_folder_loads_in_transformers(hf_folder, tmp_path):
    model = load(hf_folder)
    apply_lora(model, LoRAConfig(), HF_MAP)
    randomize_adapters(model)
    merge_lora(model)
    save_checkpoint(model, HF_MAP, hf_folder, tmp_path / "merged")
    tokens = random_prompts(128)
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        torch.testing.assert_close(hf(tokens).logits, model.eval()(tokens), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load(tmp_path / "merged")(tokens), model(tokens), atol=0, rtol=0)


def test_tied_embeddings_are_saved_once(tmp_path):
    folder = tmp_path / "tied"
    tiny_hf_model("tied-embeddings").save_pretrained(folder)
    model = load(folder)
    save_checkpoint(model, HF_MAP, folder, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = random_prompts(128)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)


def test_adapter_of_another_shape_is_refused(hf_folder, tmp_path):
    config = LoRAConfig(r=4, alpha=8)
    model = load(hf_folder)
    apply_lora(model, config, HF_MAP)
    save_adapter(model, config, HF_MAP, tmp_path / "adapter")
    wider = tmp_path / "wider"
    hf = tiny_hf_model("llama3-gqa")
    hf.config.hidden_size, hf.config.head_dim = 128, 16
    transformers.AutoModelForCausalLM.from_config(hf.config).save_pretrained(wider)
    with pytest.raises(CheckpointError, match=r"has shape \(4, 64\).*needs \(4, 128\).*another base model"):
        modelcode.load(wider, adapter=tmp_path / "adapter")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_over_a_quantized_base(hf_folder, mode):
    """QLoRA: the adapters train in bfloat16 against the frozen quantized layers; with B = 0 the logits are the
    quantized model's, and gradients reach the adapters of the first layer through the quantized ones."""
    base = modelcode.load(hf_folder, dtype=torch.bfloat16).model
    quantize(base, mode, pack=False)
    for m in base.modules():
        if isinstance(m, Int8Linear):
            m.kernel_max_rows = 0  # the matmul apply_lora makes int8 layers take (their few-row kernel has no backward)
    model = modelcode.load(hf_folder, dtype=torch.bfloat16).model
    quantize(model, mode, pack=False)
    apply_lora(model, LoRAConfig(targets=("all",), dropout=0.0), HF_MAP)
    layer = model.get_submodule("layers.0.attention.wq")
    assert isinstance(layer, LoRALinear) and layer.lora_A.dtype == torch.bfloat16
    tokens = random_prompts(128, batch=1, length=4)  # few rows: where the int8 kernel has no backward
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), base(tokens))
    model(tokens).float().logsumexp(-1).sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())
