"""`modelcode classify`: the most probable labels of images, with an image classifier (ViT)."""


def main(images: list[str], *, model: str, top_k: int = 5, dtype: str | None = None, device: str = "cpu") -> None:
    """Classify images: print each one's most probable labels with their probabilities.

    Args:
        images: image files (PNG, JPEG, ... anything Pillow reads).
        model: checkpoint folder of an image classifier (e.g. a ViTForImageClassification download).
        top_k: how many labels to print per image.
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own).
        device: cpu, cuda, cuda:1, ...
    """
    import modelcode

    classifier = modelcode.load(model, dtype=dtype, device=device, task="image-classification")
    for image, labels in zip(images, classifier.classify(list(images), top_k=top_k), strict=True):
        print(image)
        for label, prob in labels:
            print(f"  {prob:7.2%}  {label}")
