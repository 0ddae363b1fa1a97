"""The dimension reducer DR (paper §3.2, Table 1).

DR simplifies G's raw perturbation: it down-samples by a factor k (kernel k, stride k) and
up-samples back, so the perturbation is made of k×k-coherent structures that R finds easier to
predict and that survive a platform's downscaling. With `skip`, the full-resolution map is added
back, letting the model keep fine detail where the coarse map is not enough.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .config import ReducerConfig

CHANNELS = 3


class DimensionReducer(nn.Module):
    def __init__(self, config: ReducerConfig):
        super().__init__()
        if config.down is None:
            raise ValueError("a reducer needs a down-sampling mode; use no reducer for the NA model")
        self.config = config
        k = config.kernel
        self.down_conv = nn.Conv2d(CHANNELS, CHANNELS, k, stride=k) if config.down == "conv" else None
        self.up_deconv = (
            nn.ConvTranspose2d(CHANNELS, CHANNELS, k, stride=k) if config.up == "deconv" else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.config.kernel
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, -width % k, 0, -height % k), mode="replicate")
        coarse, indices = self._down(padded)
        up = self._up(coarse, indices, padded.shape[-2:])[..., :height, :width]
        return up + x if self.config.skip else up

    def _down(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        k, mode = self.config.kernel, self.config.down
        indices = None
        if mode == "conv":
            coarse = self.down_conv(x)
        elif mode == "avg":
            coarse = F.avg_pool2d(x, k)
        else:
            coarse, indices = F.max_pool2d(x, k, return_indices=True)
        if self.config.up == "unpool" and indices is None:
            # max-unpooling needs a position per window; use where the raw map is strongest
            _, indices = F.max_pool2d(x.abs(), k, return_indices=True)
        return coarse, indices

    def _up(self, coarse: torch.Tensor, indices: torch.Tensor | None, size: torch.Size) -> torch.Tensor:
        k, mode = self.config.kernel, self.config.up
        if mode == "nearest":
            return F.interpolate(coarse, scale_factor=k, mode="nearest")
        if mode == "unpool":
            return F.max_unpool2d(coarse, indices, k, output_size=size)
        return self.up_deconv(coarse)
