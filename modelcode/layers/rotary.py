"""Rotary position embedding (RoPE, Su et al. 2021, arXiv:2104.09864) and its long-context scalings.

We use the "rotate half" layout of Hugging Face checkpoints: the two halves of each head's rotary
dimensions form the (real, imaginary) pairs. Meta's checkpoints interleave the pairs instead; the
weight map permutes `wq`/`wk` between the two layouts (see `loading/weight_maps/llama.py`).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` as Hugging Face configs define it. `kind`: "llama3", "linear" or "dynamic"."""

    kind: str
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only

    @staticmethod
    def from_hf(d: dict | None) -> "RopeScaling | None":
        """Read HF's `rope_scaling` / `rope_parameters` dict; None for plain RoPE."""
        if not d:
            return None
        kind = d.get("rope_type", d.get("type", "default"))
        if kind == "default":
            return None
        if kind not in ("llama3", "linear", "dynamic"):
            raise ValueError(f"unsupported rope scaling type {kind!r}: supported are llama3, linear, dynamic")
        return RopeScaling(
            kind=kind,
            factor=float(d["factor"]),
            original_max_position_embeddings=d.get("original_max_position_embeddings"),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        )


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for i in [0, d/2): the angular speed of each rotary pair."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths are slowed by `factor`, short ones
    kept, and the band between is interpolated smoothly."""
    old_context = s.original_max_position_embeddings
    low_freq_wavelen = old_context / s.low_freq_factor
    high_freq_wavelen = old_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Turns positions (B, T) into the (cos, sin) tables that `apply_rotary` rotates q and k by."""

    def __init__(self, rotary_dim: int, theta: float, scaling: RopeScaling | None = None,
                 max_position_embeddings: int = 2048):
        super().__init__()
        self.rotary_dim, self.theta, self.scaling = rotary_dim, theta, scaling
        self.max_position_embeddings = max_position_embeddings
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute inv_freq; the loader calls this after building the model on the meta device."""
        inv_freq = rope_inv_freq(self.rotary_dim, self.theta)
        if self.scaling is not None and self.scaling.kind == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        elif self.scaling is not None and self.scaling.kind == "linear":
            inv_freq = inv_freq / self.scaling.factor  # same as dividing every position by the factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def dynamic_ntk_inv_freq(self, seq_len: int) -> torch.Tensor:
        """Dynamic NTK scaling: past the trained context, raise theta with the sequence length."""
        d, factor, max_pos = self.rotary_dim, self.scaling.factor, self.max_position_embeddings
        theta = self.theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (d / (d - 2))
        return rope_inv_freq(d, theta).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.scaling is not None and self.scaling.kind == "dynamic":
            # Stateless form of HF's rule: the scale follows the longest position in this call.
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_position_embeddings:
                inv_freq = self.dynamic_ntk_inv_freq(seq_len)
        freqs = positions[..., None].float() * inv_freq  # (B, T, rotary_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_heads, T, head_dim) by (cos, sin) (B, T, rotary_dim).

    When rotary_dim < head_dim (GPT-NeoX's `rotary_pct`), only the leading dims are rotated.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    rot_dim = cos.shape[-1]
    if rot_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
