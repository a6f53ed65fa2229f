"""The Vision Transformer (ViT; Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words", arXiv:2010.11929).

An image is cut into square patches; each patch, flattened and projected, is one token. A learned class
token is put in front, learned position embeddings are added, and a plain pre-LayerNorm Transformer
encoder (no mask: every token sees every other) mixes them. The class token's final state, normed,
goes through one linear layer to the class logits. The patch projection is a Conv2d whose kernel and
stride are both the patch size: the same linear map applied to each patch, without cutting by hand.
Names follow the Hugging Face checkpoints (`layernorm_before`, `query`, `classifier`...).
"""

from dataclasses import dataclass

import torch
from torch import nn

from modelcode.errors import UnsupportedModelError
from modelcode.layers import attend
from modelcode.layers.activation import gelu


def _pair(x: int | list | tuple) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


@dataclass
class ViTConfig:
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int  # the MLP's inner width
    num_labels: int
    image_size: tuple[int, int] = (224, 224)  # (height, width) the position embeddings were trained for
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-12
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    torch_dtype: str | None = None

    def __post_init__(self):
        self.image_size, self.patch_size = _pair(self.image_size), _pair(self.patch_size)
        self.head_dim = self.head_dim or self.dim // self.n_heads
        h, w = self.image_size
        if h % self.patch_size[0] or w % self.patch_size[1]:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def n_patches(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])

    @classmethod
    def from_hf(cls, c: dict) -> "ViTConfig":
        """From a Hugging Face `config.json` (model_type "vit") of an image classifier."""
        architectures = c.get("architectures") or ["ViTForImageClassification"]
        if "ViTForImageClassification" not in architectures:
            raise UnsupportedModelError(f"config.json says architectures={architectures}; modelcode loads ViT "
                                        "image classifiers (ViTForImageClassification), which have a classifier head")
        return cls(
            dim=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            hidden_dim=c["intermediate_size"],
            num_labels=len(c["id2label"]) if "id2label" in c else c.get("num_labels", 2),
            image_size=c.get("image_size", 224),
            patch_size=c.get("patch_size", 16),
            num_channels=c.get("num_channels", 3),
            head_dim=c.get("head_dim"),
            norm_eps=c.get("layer_norm_eps", 1e-12),
            qkv_bias=c.get("qkv_bias", True),
            hidden_act=c.get("hidden_act", "gelu"),
            torch_dtype=c.get("dtype") or c.get("torch_dtype"),
        )


class Attention(nn.Module):
    """Bidirectional multi-head self-attention."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.query = nn.Linear(cfg.dim, inner, bias=cfg.qkv_bias)
        self.key = nn.Linear(cfg.dim, inner, bias=cfg.qkv_bias)
        self.value = nn.Linear(cfg.dim, inner, bias=cfg.qkv_bias)
        self.output = nn.Linear(inner, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
                   for p in (self.query, self.key, self.value))
        y = attend(q, k, v, mask=None)
        return self.output(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.act = gelu(cfg.hidden_act)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN: each sublayer reads a normed copy and adds its output to the unnormed stream."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.layernorm_after = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.layernorm_before(x))
        return h + self.mlp(self.layernorm_after(h))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.patch_embeddings = nn.Conv2d(cfg.num_channels, cfg.dim, kernel_size=cfg.patch_size,
                                          stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + cfg.n_patches, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.classifier = nn.Linear(cfg.dim, cfg.num_labels)

    def hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, H, W), already resized and normalized -> final normed states (B, 1 + n_patches, dim);
        index 0 is the class token."""
        B = pixels.shape[0]
        expected = (self.config.num_channels, *self.config.image_size)
        if tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"pixels of shape {tuple(pixels.shape[1:])} (channels, height, width), but this ViT takes "
                             f"{expected}: resize the images first")
        patches = self.patch_embeddings(pixels.to(self.patch_embeddings.weight.dtype))  # (B, dim, H/p, W/p)
        h = patches.flatten(2).transpose(1, 2)  # (B, n_patches, dim), patches in row-major order
        h = torch.cat((self.cls_token.expand(B, -1, -1), h), dim=1) + self.position_embeddings
        for layer in self.layers:
            h = layer(h)
        return self.layernorm(h)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, H, W) -> class logits (B, num_labels)."""
        return self.classifier(self.hidden_states(pixels)[:, 0])
