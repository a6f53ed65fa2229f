"""Image classification: image files -> the checkpoint's labels with their probabilities.

Preprocessing follows the folder's `preprocessor_config.json` exactly as transformers' ViT image
processor applies it: convert to RGB (transparency composited onto white), resize to `size` with the
named Pillow `resample` filter, multiply by `rescale_factor` (1/255), then normalize each channel with
`image_mean` / `image_std`. Pillow and torch only (no torchvision).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from modelcode.errors import ArgumentError, CheckpointError

ImageInput = str | Path | Image.Image


def open_image(path: str | Path) -> Image.Image:
    """Read an image file, with an error that names the file when it is missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path} as an image ({e}); pass an image file such as PNG or JPEG") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited onto white (what transformers' convert_to_rgb does)."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class ImageProcessor:
    """The settings of a `preprocessor_config.json`; missing ones default as in transformers' ViT processor."""

    size: tuple[int, int] = (224, 224)  # (height, width)
    resample: int = Image.Resampling.BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_json(cls, path: Path) -> "ImageProcessor":
        if not path.is_file():
            raise CheckpointError(f"no {path.name} in {path.parent}: it gives the image size, mean and std the "
                                  "model was trained with; download it with the weights")
        c = json.loads(path.read_text())
        size = c.get("size", 224)
        if isinstance(size, int):  # old feature-extractor configs: a square side
            size = {"height": size, "width": size}
        if "height" not in size or "width" not in size:
            raise CheckpointError(f"{path}: size {size} is not supported; expected {{'height': H, 'width': W}}")
        if c.get("do_center_crop"):
            raise CheckpointError(f"{path}: do_center_crop is not supported; ViT processors resize to the size")
        d = cls()
        return cls(size=(size["height"], size["width"]), resample=c.get("resample", d.resample),
                   do_resize=c.get("do_resize", True), do_rescale=c.get("do_rescale", True),
                   rescale_factor=c.get("rescale_factor", d.rescale_factor),
                   do_normalize=c.get("do_normalize", True), image_mean=tuple(c.get("image_mean", d.image_mean)),
                   image_std=tuple(c.get("image_std", d.image_std)))

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> pixels (B, 3, height, width), float32."""
        return torch.stack([self.one(image) for image in images])

    def one(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        if self.do_resize:
            height, width = self.size
            image = image.resize((width, height), resample=self.resample)  # Pillow takes (width, height)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).double()  # (3, H, W), values 0..255
        if self.do_rescale:
            x = x * self.rescale_factor
        x = x.float()  # rescaled in float64, then cast, as transformers does: the same float32 values
        if self.do_normalize:
            mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
            x = (x - mean[:, None, None]) / std[:, None, None]
        return x


@dataclass
class ImageClassifier:
    """A loaded image classifier (`modelcode.load` on a ViT folder): `classify` images by file name."""

    model: nn.Module
    config: object
    path: Path
    processor: ImageProcessor
    labels: list[str]  # index -> name, from config.json's id2label

    @classmethod
    def from_folder(cls, model: nn.Module, config, folder: Path) -> "ImageClassifier":
        hf = json.loads((folder / "config.json").read_text())
        id2label = {int(i): name for i, name in hf.get("id2label", {}).items()}
        labels = [id2label.get(i, f"LABEL_{i}") for i in range(model.classifier.out_features)]
        return cls(model, config, folder, ImageProcessor.from_json(folder / "preprocessor_config.json"), labels)

    def pixels(self, images: list[ImageInput]) -> torch.Tensor:
        """Files or PIL images -> the model's input (B, 3, H, W) on its device and dtype."""
        opened = [image if isinstance(image, Image.Image) else open_image(image) for image in images]
        p = self.model.classifier.weight
        return self.processor(opened).to(device=p.device, dtype=p.dtype)

    @torch.inference_mode()
    def classify(self, images: ImageInput | list[ImageInput], top_k: int = 5):
        """The `top_k` most probable labels, as [(label, probability), ...] best first, for one image; a
        list of such lists for a list of images."""
        if isinstance(images, (str, Path, Image.Image)):
            return self.classify([images], top_k)[0]
        if top_k < 1:
            raise ArgumentError("top_k", f"must be at least 1, got {top_k}")
        probs = self.model(self.pixels(images)).float().softmax(-1)  # (B, num_labels)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        return [[(self.labels[i], p) for p, i in zip(ps.tolist(), ids.tolist(), strict=True)]
                for ps, ids in zip(top.values, top.indices, strict=True)]
