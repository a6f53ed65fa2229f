"""Tiny random Hugging Face models, saved the ways checkpoints come, for parity tests."""

import json
from pathlib import Path

import torch
import transformers

# hidden 64 with multiple_of 32 gives Meta's FFN width 192, so the same weights fit params.json too.
BASE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, rms_norm_eps=1e-5)

LLAMA_VARIANTS = {
    "llama2-mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama3-gqa": ("LlamaConfig", dict(rope_theta=500000.0)),
    "llama3.1-rope-scaling": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "linear-rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "dynamic-ntk-rope": ("LlamaConfig", dict(max_position_embeddings=8,
                                             rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "mistral-sliding-window": ("MistralConfig", dict(sliding_window=4, head_dim=None)),
    "mistral-head-dim": ("MistralConfig", dict(head_dim=32, sliding_window=None)),
    "qwen2-qkv-bias": ("Qwen2Config", dict()),
    "tied-embeddings": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "untied-embeddings": ("LlamaConfig", dict(tie_word_embeddings=False)),
}


def tiny_hf_model(variant: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random HF causal LM; every weight (biases and norms too) drawn so that no mapping hides."""
    config_class, overrides = LLAMA_VARIANTS[variant]
    config = getattr(transformers, config_class)(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    return model


def save_bin(model, folder: Path, shards: int = 1) -> Path:
    """Write `pytorch_model.bin` (or a sharded .bin index) as transformers 4 did."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def random_prompts(vocab_size: int, batch: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def assert_cached_decode_equals_full_pass(model, vocab_size: int, static: bool, prefill: int = 5, length: int = 14):
    """Prefill `prefill` tokens into a KV cache, then decode the rest one by one: the logits must equal
    one full forward pass over the whole sequence (1e-5)."""
    tokens = random_prompts(vocab_size, batch=2, length=length)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch_size=2, max_seq_len=32, static=static)
        positions = torch.arange(length).expand(2, length)
        steps = [model(tokens[:, :prefill], positions[:, :prefill], cache)]
        for t in range(prefill, length):
            steps.append(model(tokens[:, t : t + 1], positions[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
