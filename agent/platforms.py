"""What social platforms do to an uploaded photo before their classifier sees it (issue 7, the
paper's Fig. 7 and beyond): blur, recompression, cropping, flipping and resizing, and a typical
upload pipeline. The evaluation measures how much of the protection survives each.

Every transform takes [0, 1] images (N, 3, H, W), is deterministic, and returns a [0, 1] batch,
whose size may differ (crop, resizes). Resizes are antialiased bilinear, as platforms' resizers
are; the long-side resizes also enlarge smaller images (for a 224-px crop "1080 px long side" is an
upscale), since that is what the issue asks for and what a platform's fixed display size does.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from .rgan.transforms import downscale, jpeg

BLUR_SIGMA = 2.0
# ±3σ: the Gaussian's weight beyond it is negligible
BLUR_KERNEL = 13


def gaussian_blur(images: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    return TF.gaussian_blur(images, kernel_size=[BLUR_KERNEL, BLUR_KERNEL], sigma=[sigma, sigma])


def centre_crop_fraction(images: torch.Tensor, fraction: float = 0.9) -> torch.Tensor:
    height, width = images.shape[-2:]
    h, w = round(height * fraction), round(width * fraction)
    top, left = (height - h) // 2, (width - w) // 2
    return images[..., top : top + h, left : left + w]


def resize_long_side(images: torch.Tensor, side: int) -> torch.Tensor:
    """Scales so that the longer side is `side`, keeping the aspect ratio; enlarges small images."""
    height, width = images.shape[-2:]
    ratio = side / max(height, width)
    size = (max(1, round(height * ratio)), max(1, round(width * ratio)))
    resized = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    # the filter's weights are a convex combination only up to float rounding
    return resized.clamp(0, 1)


def _pillow_round_trip(images: torch.Tensor, format: str, **options) -> torch.Tensor:
    """Encodes each image with Pillow in `format` and decodes it: the decoded pixels are what the
    platform's classifier sees."""
    arrays = (images.detach().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=format, **options)
        buffer.seek(0)
        with Image.open(buffer) as image:
            decoded.append(np.asarray(image.convert("RGB")))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float() / 255
    return out.to(images.device, images.dtype)


def webp(images: torch.Tensor, quality: int = 80) -> torch.Tensor:
    return _pillow_round_trip(images, "WEBP", quality=quality)


def social_pipeline(images: torch.Tensor) -> torch.Tensor:
    """A typical upload: long side to 1080 px, JPEG 75, metadata stripped (no EXIF, no ICC profile
    written). Stripping changes no pixel; it is here so the encoding is the one platforms serve."""
    return _pillow_round_trip(resize_long_side(images, 1080), "JPEG", quality=75, exif=b"")


PLATFORM_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda images: images,
    "Gaussian blur σ=2": gaussian_blur,
    "JPEG 95": partial(jpeg, quality=95),
    "JPEG 90": partial(jpeg, quality=90),
    "JPEG 75": partial(jpeg, quality=75),
    "JPEG 70": partial(jpeg, quality=70),
    "centre crop 90%": centre_crop_fraction,
    "horizontal flip": lambda images: images.flip(-1),
    "vertical flip": lambda images: images.flip(-2),
    "resize to half": partial(downscale, scale=0.5),
    "resize to 1080 px long side": partial(resize_long_side, side=1080),
    "resize to 2048 px long side": partial(resize_long_side, side=2048),
    "WebP 80": webp,
    "social pipeline": social_pipeline,
}
