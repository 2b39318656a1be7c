"""The pinned digests were produced by torchvision 0.29.1's
``Compose([Resize((448, 448), BICUBIC), ToTensor(), Normalize(CLIP mean, std)])`` (the official
Qwen-VL transform) on the same inputs, with Pillow 13.0.0: equal digests mean bit-identical output."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from worker.engine.model.preprocess import preprocess_image, preprocess_images


def gradient_image(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x * 7 + y * 13) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def digest(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("image", "sha256", "corner", "mean"),
    [
        (gradient_image(300, 200), "76393b36fdd9ea6587d8232b23723001d3b10fa028ccb4c4705d063c29327577", -0.442155, 0.182713),
        (gradient_image(1000, 700), "a17cc58c80464f68b49664efd93079d48cf6c857c9b37f828eb82352496e1c8b", 1.349573, 0.182835),
        (gradient_image(300, 200).convert("L"), "cce89e5f45d6d29615700e135d319b0b6ccebca01a66670da5dbc662ec6cc71f", 1.847276, 0.18129),
    ],
    ids=["upscaled", "downscaled", "greyscale"],
)
def test_preprocessing_is_bit_identical_to_the_reference_transform(image, sha256, corner, mean):
    pixels = preprocess_image(image)
    assert pixels.shape == (3, 448, 448) and pixels.dtype == torch.float32
    assert pixels[0, 0, 0].item() == pytest.approx(-1.792263, abs=1e-6)
    assert pixels[2, 447, 447].item() == pytest.approx(corner, abs=1e-6)
    assert pixels.mean().item() == pytest.approx(mean, abs=1e-6)
    assert digest(pixels) == sha256


def test_alpha_is_dropped_as_pil_converts_to_rgb():
    image = gradient_image(300, 200)
    assert torch.equal(preprocess_image(image.convert("RGBA")), preprocess_image(image))


def test_a_real_photo_matches_the_reference_transform(sample_images):
    pixels = preprocess_image(Image.open(sample_images / "demo.jpeg"))
    assert digest(pixels) == "3dd65d16040fe9f16cb92ad539dfe6c4afde8a63cfd0ba6650727e79dcc88c31"
    assert pixels[:, 10, 20].tolist() == [1.3755959272384644, 1.5796273946762085, 1.6766349077224731]


def test_a_batch_stacks_images_in_order():
    a, b = gradient_image(300, 200), gradient_image(1000, 700)
    batch = preprocess_images([a, b])
    assert batch.shape == (2, 3, 448, 448)
    assert torch.equal(batch[1], preprocess_image(b))
    assert preprocess_images([]).shape == (0, 3, 448, 448)
