"""Bring raw images to the model's format: C channels, S×S, float32 in [-1, 1].

Every loader (sensitive and public) goes through these two functions so that MNIST digits and
public glyphs see exactly the same resize and scaling.
"""

from __future__ import annotations

import torch
from PIL import Image

# torchvision's functional transforms are imported where they are used: importing torchvision
# takes seconds, and the dataset modules that import this one are also imported to validate a
# config, which should be refused without that wait.
# Resizing a whole dataset in one call would allocate N×C×H×W float32 twice; chunks keep the
# peak near the size of the result.
_CHUNK = 4096


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Gray -> RGB by repetition, RGB -> gray by ITU-R 601 luma (as PIL's ``convert("L")``)."""
    have = images.shape[-3]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    if have == 3 and channels == 1:
        from torchvision.transforms.v2 import functional as TF

        return TF.rgb_to_grayscale(images, num_output_channels=1)
    raise ValueError(f"cannot convert {have} channels to {channels}")


def resize_square(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize float images ``[..., C, H, W]`` to ``S×S`` with antialiasing (bilinear)."""
    if images.shape[-2:] == (image_size, image_size):
        return images
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(images, [image_size, image_size], antialias=True)


def model_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model images in [-1, 1] -> uint8 (0..255), same shape: how samples are stored and scored."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def uint8_to_model(images: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` (0..255) -> float32 ``[N, channels, S, S]`` in [-1, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    out = torch.empty((len(images), channels, image_size, image_size), dtype=torch.float32)
    for start in range(0, len(images), _CHUNK):
        x = images[start : start + _CHUNK].to(torch.float32).div_(255.0)
        x = resize_square(convert_channels(x, channels), image_size)
        # Not in place: gray -> RGB is an expanded view.
        out[start : start + _CHUNK] = x.clamp(0.0, 1.0) * 2.0 - 1.0
    return out


def pil_to_model(
    img: Image.Image, image_size: int, channels: int, crop_size: int | None = None
) -> torch.Tensor:
    """One PIL image -> float32 ``[channels, S, S]`` in [-1, 1].

    Takes a centred square of side ``crop_size`` (default: the shorter side) before resizing,
    so faces and non-square photos are not distorted.
    """
    from torchvision.transforms.v2 import functional as TF

    img = img.convert("L" if channels == 1 else "RGB")
    x = TF.pil_to_tensor(img)
    side = min(x.shape[-2:]) if crop_size is None else crop_size
    x = TF.center_crop(x, [side, side])
    return uint8_to_model(x.unsqueeze(0), image_size, channels)[0]
