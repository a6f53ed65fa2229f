"""What a benchmark runs: our model (from a folder, the embedded one, or random weights of a named shape)
and transformers' twin of it on the very same weight tensors."""

from pathlib import Path

import torch
from torch import nn

from modelcode.loading import build
from modelcode.loading.save import to_checkpoint_names
from modelcode.loading.weight_maps import llama as llama_maps
from modelcode.models.llama import Llama, LlamaConfig


def random_model(preset: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A model of a named shape (`loading.registry.PRESETS`) with random weights, built on the meta device and
    materialised tensor by tensor in `dtype`, so an 8B shape never passes through float32."""
    return random_weights(build(preset=preset).model, dtype, device, seed)


def random_weights(model: nn.Module, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """Give a model built on the meta device random weights, in place: matrices N(0, 0.02) like a fresh init,
    vectors (norms, biases) N(1, 0.1), so activations keep a sane scale and no two tensors are alike (a
    swapped pair would show in a parity test). Tied weights stay tied."""
    g = torch.Generator(device).manual_seed(seed)
    made: dict[int, nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if id(p) not in made:
            t = torch.empty(p.shape, dtype=dtype, device=device)
            made[id(p)] = nn.Parameter(t.normal_(1.0, 0.1, generator=g) if p.dim() == 1 else
                                       t.normal_(0.0, 0.02, generator=g), requires_grad=False)
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, made[id(p)])
    with torch.device(device):
        for m in model.modules():
            if hasattr(m, "reset_buffers"):
                m.reset_buffers()  # the rotary tables
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer (quantized layers keep their codes
    and scales in buffers), except the embedding table, of which a step reads one row per sequence, unless
    the output head is tied to it."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    heads = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    for e in embeddings:
        if id(e) not in heads:
            tensors.pop(id(e), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def hf_config(config: LlamaConfig):
    """The transformers config of a Llama-family config: the inverse of `LlamaConfig.from_hf`."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if (s := config.rope_scaling) is not None:
        rope.update(rope_type=s.kind, factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
    kw = dict(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
              num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
              num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
              max_position_embeddings=config.max_seq_len, tie_word_embeddings=config.tie_word_embeddings,
              rope_parameters=rope, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if config.sliding_window is not None:
        if config.sliding_layers is not None:
            raise ValueError("a per-layer sliding window has no transformers twin here: run with --no-hf")
        return transformers.MistralConfig(**kw, sliding_window=config.sliding_window)
    if config.qkv_bias and not config.o_bias:
        return transformers.Qwen2Config(**kw)
    return transformers.LlamaConfig(**kw, attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)


def hf_twin(model: nn.Module, folder: Path | None = None) -> nn.Module:
    """transformers' model of our model, sharing its weight tensors (no copy). Llama-family models of any
    origin go through the inverse weight map; other architectures load their folder with from_pretrained."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("the comparison with transformers needs it installed: pip install transformers "
                          "(or run the benchmark with --no-hf)") from e
    p = next(model.parameters())
    if not isinstance(model, Llama):
        if folder is None or not (folder / "config.json").exists():
            raise ValueError(f"no transformers twin for a {type(model).__name__} without a Hugging Face folder: "
                             "run with --no-hf")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=p.dtype).to(p.device).eval()
    config = hf_config(model.config)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=p.dtype)
    state = to_checkpoint_names(model.state_dict(), llama_maps.HF)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied below
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"transformers twin: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    # Its rotary tables are buffers left out of the state dict: build them for real on our device.
    with torch.device(p.device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)
    return hf.eval()
