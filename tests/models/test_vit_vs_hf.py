"""ViT equals transformers' ViTForImageClassification on the same weights, and our Pillow + torch
preprocessing equals transformers' ViT image processor on real PNG and JPEG files."""

import json

import numpy as np
import pytest
import torch
import transformers
from cli_helpers import cli_error
from PIL import Image

import modelcode
from modelcode.cli.__main__ import main as cli
from modelcode.errors import CheckpointError
from modelcode.tasks.classification import ImageClassifier

LABELS = {0: "cat", 1: "dog", 2: "frog", 3: "ship", 4: "truck", 5: "plane", 6: "horse"}
# Non-square images, a resample filter other than the default and per-channel statistics, so that a
# swapped height/width, filter or channel order would show.
PREPROCESSOR = dict(size={"height": 32, "width": 48}, resample=Image.Resampling.BICUBIC,
                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def reference_processor(**overrides):
    # Without torchvision transformers' ViTImageProcessor is this Pillow/NumPy backend.
    return transformers.ViTImageProcessorPil(**{**PREPROCESSOR, **overrides})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=[32, 48], patch_size=8, id2label=LABELS)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # every weight drawn, biases and norms too, so that no mapping mistake hides
        for p in hf.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.1)
    path = tmp_path_factory.mktemp("vit")
    hf.save_pretrained(path)
    reference_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(folder):
    return transformers.ViTForImageClassification.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real image files: smooth-ish photos-to-be (random noise upsampled) saved as PNG and JPEG."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("images")
    files = []
    for name, size in (("a.png", (70, 50)), ("b.jpg", (40, 90)), ("c.jpeg", (48, 32))):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        noisy = np.asarray(small.resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
        noisy = noisy + rng.integers(-20, 21, noisy.shape)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path / name)
        files.append(path / name)
    return files


def test_logits_equal_transformers(folder, hf_model):
    clf = modelcode.load(folder, dtype=torch.float32)
    assert isinstance(clf, ImageClassifier)
    pixels = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(clf.model(pixels), hf_model(pixels).logits, atol=1e-4, rtol=1e-4)


def test_preprocessing_equals_transformers(folder, images):
    clf = modelcode.load(folder)
    expected = reference_processor()([Image.open(f) for f in images], return_tensors="pt").pixel_values
    actual = clf.pixels(images)
    assert actual.shape == (3, 3, 32, 48)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


def test_preprocessing_other_modes_as_transformers_rgb_conversion(folder, tmp_path):
    """Grayscale, palette and transparent images become RGB (transparency onto white) as transformers does."""
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    rgba[:10, :, 3] = 0  # a fully transparent band: white after conversion
    files = {"rgba.png": Image.fromarray(rgba, "RGBA"),
             "gray.png": Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L")}
    files["palette.png"] = files["rgba.png"].convert("RGB").convert("P")
    for name, image in files.items():
        image.save(tmp_path / name)
    paths = [tmp_path / name for name in files]
    expected = reference_processor(do_convert_rgb=True)([Image.open(p) for p in paths], return_tensors="pt")
    torch.testing.assert_close(modelcode.load(folder).pixels(paths), expected.pixel_values, atol=1e-6, rtol=0)


def test_old_feature_extractor_config(folder, images, tmp_path):
    """Hub ViT folders from 2021 write `size` as one int and leave rescaling to the processor's default."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 40}))
    processor = modelcode.load(old).processor
    assert processor.size == (40, 40) and processor.rescale_factor == pytest.approx(1 / 255)
    expected = transformers.ViTImageProcessorPil(size=40, resample=2)([Image.open(images[0])], return_tensors="pt")
    torch.testing.assert_close(processor([Image.open(images[0])]), expected.pixel_values, atol=1e-6, rtol=0)


def test_classify_gives_transformers_probabilities(folder, hf_model, images):
    clf = modelcode.load(folder)
    results = clf.classify(images, top_k=3)
    with torch.no_grad():
        pixels = reference_processor()([Image.open(f) for f in images], return_tensors="pt").pixel_values
        probs = hf_model(pixels).logits.softmax(-1)
    for result, p in zip(results, probs, strict=True):
        top = p.topk(3)
        assert [label for label, _ in result] == [LABELS[i] for i in top.indices.tolist()]
        assert [prob for _, prob in result] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert len({tuple(label for label, _ in r) for r in results}) > 1, "different images should rank differently"
    single = clf.classify(images[0], top_k=7)  # one image in, one ranking out
    assert sorted(label for label, _ in single) == sorted(LABELS.values())
    assert sum(prob for _, prob in single) == pytest.approx(1.0, abs=1e-5)


def test_missing_image_names_the_file(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image not found: .*nowhere\.png"):
        modelcode.load(folder).classify(tmp_path / "nowhere.png")


def test_not_an_image_names_the_file(folder, tmp_path):
    (tmp_path / "notes.png").write_text("this is text, not a picture")
    with pytest.raises(ValueError, match=r"cannot read .*notes\.png as an image .*PNG or JPEG"):
        modelcode.load(folder).classify([tmp_path / "notes.png"])


def test_missing_preprocessor_config(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path / "v", ignore=shutil.ignore_patterns("preprocessor_config.json"))
    with pytest.raises(CheckpointError, match="no preprocessor_config.json in .*image size, mean and std"):
        modelcode.load(tmp_path / "v")


def test_wrong_pixel_size(folder):
    with pytest.raises(ValueError, match=r"pixels of shape \(3, 64, 64\).*takes \(3, 32, 48\)"):
        modelcode.load(folder).model(torch.zeros(1, 3, 64, 64))


def test_cli_classify(folder, images, capsys):
    cli(["classify", str(images[0]), str(images[1]), "--model", str(folder), "--top-k", "2"])
    out = capsys.readouterr().out.splitlines()
    expected = modelcode.load(folder).classify(images[:2], top_k=2)
    assert out[0] == str(images[0]) and out[3] == str(images[1])
    for line, (label, prob) in zip(out[1:3] + out[4:6], expected[0] + expected[1], strict=True):
        assert line.split() == [f"{prob:.2%}", label]


def test_cli_classify_bad_image(folder, tmp_path, capsys):
    cli_error(["classify", str(tmp_path / "missing.jpg"), "--model", str(folder)], capsys,
              r"modelcode classify: error: image not found: .*missing\.jpg")


def test_bfloat16(folder, images):
    clf = modelcode.load(folder, dtype="bfloat16")
    assert clf.model.classifier.weight.dtype == torch.bfloat16
    assert len(clf.classify(images[0], top_k=2)) == 2
