"""What happens to a protected image on its way to a platform's classifier or back to its owner:
JPEG recompression and downscaling. Training puts them between G and C (and between G and R) so
that the protection survives them; evaluation applies the same ones to measure that it does."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def jpeg(images: torch.Tensor, quality: int | list[int]) -> torch.Tensor:
    """Encodes each [0, 1] image of (N, 3, H, W) as a JPEG (Pillow, 4:2:0 as most platforms use)
    and decodes it again. Not differentiable; see `straight_through`."""
    qualities = [quality] * len(images) if isinstance(quality, int) else list(quality)
    arrays = (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for array, q in zip(arrays, qualities):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=int(q))
        buffer.seek(0)
        with Image.open(buffer) as image:
            decoded.append(np.asarray(image.convert("RGB")))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float() / 255
    return out.to(images.device, images.dtype)


def straight_through(x: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
    """`transformed`'s values with the identity's gradient (BPDA): C sees the real codec's
    output while G still receives a gradient."""
    return x + (transformed - x).detach()


def downscale(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Antialiased bilinear downscaling, as torchvision's Resize does it; differentiable."""
    if scale >= 1:
        return images
    height, width = images.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize_short_side(images: torch.Tensor, short: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    ratio = short / min(height, width)
    size = (max(short, round(height * ratio)), max(short, round(width * ratio)))
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def centre_crop(images: torch.Tensor, side: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    top, left = (height - side) // 2, (width - side) // 2
    return images[..., top : top + side, left : left + side]


def platform_view(images: torch.Tensor, how: str) -> torch.Tensor:
    """The 224×224 input a platform's ImageNet classifier would see: "crop" is torchvision's
    standard (shorter side to 256, centre crop 224), "squash" resizes the whole photo to 224×224."""
    if how == "crop":
        return centre_crop(resize_short_side(images, 256), 224)
    if how == "squash":
        return F.interpolate(images, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    raise ValueError(f"view must be crop or squash, got {how!r}")
