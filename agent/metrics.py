"""Image and classifier metrics (paper §4.2), per image on [0, 1] pixels of shape (N, C, H, W)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# SSIM as in Wang et al. 2004: 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
# PSNR of identical images is infinite; reported values are capped here so means stay finite.
PSNR_CAP = 100.0


def l2(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L2 norm of the error per image."""
    return (image - reference).flatten(1).norm(dim=1)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    mse = (image - reference).flatten(1).pow(2).mean(dim=1)
    return (10 * torch.log10(1 / mse)).clamp(max=PSNR_CAP)


def _gaussian_window(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=dtype, device=device) - SSIM_WINDOW // 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image over the valid (unpadded) windows, channels averaged."""
    channels = image.shape[1]
    window = _gaussian_window(channels, image.dtype, image.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_x, mu_y = blur(image), blur(reference)
    var_x = blur(image * image) - mu_x**2
    var_y = blur(reference * reference) - mu_y**2
    cov = blur(image * reference) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels).float().mean().item()


def error_rate(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Classification error rate (CER)."""
    return 1 - accuracy(predictions, labels)


def attack_success_rate(predictions: torch.Tensor, clean_predictions: torch.Tensor) -> float:
    """Share of images whose prediction moved away from the clean image's prediction; needs no
    labels, so it also applies to users' unlabelled photos."""
    return (predictions != clean_predictions).float().mean().item()
