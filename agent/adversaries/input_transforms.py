"""The classic input-transform defences, as an attacker's cheap purifiers: no training, applied to
a protected photo in the hope of removing the perturbation while keeping the picture.

- JPEG compression at quality 75 (Dziugaite et al. 2016; Guo et al., ICLR 2018).
- Bit-depth reduction, the "feature squeezing" of Xu, Evans & Qi (NDSS 2018).
- A 3×3 median filter, Xu et al.'s spatial smoothing squeezer.
- Total-variation minimisation (Guo, Rana, Cissé & van der Maaten, ICLR 2018): drop a random half of
  the pixels and reconstruct the image from the rest with a TV prior. Guo et al. solve it by a
  special-purpose solver; here Chambolle–Pock's primal–dual iterations solve the same convex
  problem, a fixed number of times, from a fixed seed, so the result is reproducible.
- Random resizing and padding (Xie, Wang, Zhang, Ren & Yuille, ICLR 2018), which changes the
  geometry; see `random_resize_pad` for what it returns here.

Each is `(images) -> images` on [0, 1] (N, 3, H, W) of any size, returns the same shape, and is
deterministic: the random ones draw from a fixed seed unless given a generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..rgan.transforms import jpeg


def _default(generator: torch.Generator | None) -> torch.Generator:
    return torch.Generator().manual_seed(0) if generator is None else generator


def jpeg_75(images: torch.Tensor) -> torch.Tensor:
    return jpeg(images, 75)


def bit_depth(images: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Rounds each channel to 2^bits levels. 4 bits is Xu et al.'s depth for ImageNet-sized photos:
    the levels are 17/255 apart, so an 8/255 perturbation mostly rounds back to the clean level,
    while a photo stays recognisable (fewer bits would posterise it visibly)."""
    levels = 2**bits - 1
    return torch.round(images.clamp(0, 1) * levels) / levels


def median_3x3(images: torch.Tensor) -> torch.Tensor:
    """Median of each pixel's 3×3 neighbourhood, reflecting at the borders so edges keep their
    own statistics."""
    height, width = images.shape[-2:]
    mode = "reflect" if min(height, width) > 1 else "replicate"
    padded = F.pad(images, (1, 1, 1, 1), mode=mode)
    windows = padded.unfold(2, 3, 1).unfold(3, 3, 1)  # (N, C, H, W, 3, 3)
    return windows.reshape(*images.shape, 9).median(dim=-1).values


def _gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences, zero across the last row / column (Neumann boundary)."""
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
    return dy, dx


def _divergence(py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """The negative adjoint of `_gradient`."""
    dy = torch.cat([py[..., :1, :], py[..., 1:-1, :] - py[..., :-2, :], -py[..., -2:-1, :]], dim=-2)
    dx = torch.cat([px[..., :1], px[..., 1:-1] - px[..., :-2], -px[..., -2:-1]], dim=-1)
    return dy + dx


def tv_minimisation(
    images: torch.Tensor,
    weight: float = 0.03,
    steps: int = 60,
    keep: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Guo et al.'s TV reconstruction: keeps each pixel (all channels together) with probability
    `keep` and solves min_z ½·Σ kept·(z − y)² + weight·TV(z), TV isotropic per channel; dropped
    pixels are filled in by the TV prior alone. `keep=1` is plain TV denoising (Rudin–Osher–Fatemi).

    Dropped pixels start from the mean of their kept 3×3 neighbours, so the iterations only have
    to refine. 60 steps take about 0.1 s for a 224×224 image on one CPU core."""
    y = images.clamp(0, 1)
    n, _, height, width = y.shape
    kept = (torch.rand(n, 1, height, width, generator=_default(generator)) < keep).to(y)
    kept_sum = F.avg_pool2d(F.pad(kept * y, (1, 1, 1, 1)), 3, 1)
    kept_count = F.avg_pool2d(F.pad(kept, (1, 1, 1, 1)), 3, 1)
    z = torch.where(kept.bool(), y, torch.where(kept_count > 0, kept_sum / kept_count.clamp_min(1e-12), y.mean()))
    # step sizes with τ·σ·‖∇‖² ≤ 1 (‖∇‖² ≤ 8) guarantee convergence
    tau = sigma = 1 / math.sqrt(8)
    py, px = torch.zeros_like(y), torch.zeros_like(y)
    z_bar = z
    for _ in range(steps):
        gy, gx = _gradient(z_bar)
        py, px = py + sigma * gy, px + sigma * gx
        # the dual of weight·‖·‖: project each pixel's (py, px) onto the ball of radius `weight`
        scale = (torch.sqrt(py**2 + px**2) / weight).clamp_min(1)
        py, px = py / scale, px / scale
        v = z + tau * _divergence(py, px)
        z_next = (v + tau * kept * y) / (1 + tau * kept)
        z_bar, z = 2 * z_next - z, z_next
    return z.clamp(0, 1)


def random_resize_pad(
    images: torch.Tensor, generator: torch.Generator | None = None, *, scale: float = 1.1
) -> torch.Tensor:
    """Xie et al.'s randomisation: each image is resized to a random size between its own and
    `scale` times its own (same factor for height and width), then placed at a random offset on a
    black canvas `scale` times its size (Xie et al.: 299 → [299, 331), padded to 331).

    Contract: the canvas is resized back to the input's size (antialiased bilinear) and returned,
    so the output has the input's shape. Xie et al. classify the canvas itself; a classifier that
    resizes its input (as every platform's does) sees nearly the same thing, and the returned image
    is what an attacker would keep as the "recovered" photo, so its PSNR against the original is
    meaningful."""
    generator = _default(generator)
    height, width = images.shape[-2:]
    canvas_h, canvas_w = round(height * scale), round(width * scale)
    out = []
    for image in images.clamp(0, 1):
        factor = 1 + (scale - 1) * float(torch.rand(1, generator=generator))
        h, w = min(round(height * factor), canvas_h), min(round(width * factor), canvas_w)
        resized = F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        top = int(torch.randint(0, canvas_h - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, canvas_w - w + 1, (1,), generator=generator))
        canvas = F.pad(resized, (left, canvas_w - w - left, top, canvas_h - h - top))
        back = F.interpolate(canvas, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        out.append(back[0])
    return torch.stack(out).clamp(0, 1)


INPUT_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "JPEG 75": jpeg_75,
    "bit depth 4": bit_depth,
    "median 3×3": median_3x3,
    "TV minimisation": tv_minimisation,
    "random resize + pad": random_resize_pad,
}
