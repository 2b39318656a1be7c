"""Image preprocessing exactly as Qwen-VL-Chat's reference pipeline does it.

The reference is torchvision's ``Compose([Resize((448, 448), BICUBIC), ToTensor(), Normalize(CLIP)])``
applied to a PIL image after ``convert("RGB")``. On a PIL image torchvision's Resize is PIL's own
``Image.resize`` (bicubic, antialiased when shrinking, no aspect preservation, no crop), ToTensor is
``uint8 / 255`` in float32, and Normalize is an in-place ``(x - mean) / std`` per channel. This
module does the same steps with PIL, numpy and torch, so its output is bit-identical to
torchvision's without depending on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 448

_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)


def preprocess_image(image: Image.Image, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """One PIL image -> float32 ``[3, image_size, image_size]``, CLIP-normalised.

    Any mode is accepted (RGBA drops alpha, L is replicated, P is expanded) exactly as PIL's
    ``convert("RGB")`` does; EXIF orientation is not applied, as in the reference.
    """
    rgb = image.convert("RGB")
    resized = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())  # [H, W, 3] uint8
    x = pixels.permute(2, 0, 1).to(torch.float32).div(255)  # [3, H, W] in [0, 1]
    return x.sub_(_MEAN).div_(_STD)


def preprocess_images(images: Sequence[Image.Image], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Several PIL images -> float32 ``[N, 3, image_size, image_size]``."""
    if not images:
        return torch.empty(0, 3, image_size, image_size)
    return torch.stack([preprocess_image(image, image_size) for image in images])
