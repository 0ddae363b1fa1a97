"""The RGAN's networks (paper §3.2, Fig. 3), built from a few shared blocks.

G and R are the same encoder / residual bottleneck / decoder shape (R is "homologous to G"); both
end in a raw 3-channel map that the model bounds into a perturbation. D is a small PatchGAN-style
critic, so it works at any input size.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

# The encoder halves the size twice, so inputs are padded to a multiple of this.
ENCODER_STRIDE = 4


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Instance norm (the paper's choice) normalises with statistics of the whole image, so a
    tile of an image is processed differently from the image itself. Batch norm in eval mode is a
    fixed per-channel affine map: the network stays purely local, which is what exact tiling of
    large photos needs."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be instance or batch, got {kind!r}")


def conv_block(c_in: int, c_out: int, kernel: int, stride: int, norm: str = "instance") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, padding_mode="reflect"),
        norm_layer(norm, c_out),
        nn.ReLU(inplace=True),
    )


def up_block(c_in: int, c_out: int, norm: str = "instance") -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1),
        norm_layer(norm, c_out),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm: str = "instance"):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            norm_layer(norm, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect"),
            norm_layer(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PerturbationNet(nn.Module):
    """Encoder (3 convolutions, down-sampling x4) → `depth` residual blocks → decoder.

    Used as G (image → raw perturbation) and as R (adversarial image → raw estimate of the
    perturbation). Any input size works: it is padded to a multiple of the total stride and
    cropped back. `in_channels` > 3 carries the key planes. With `stride` 2 the first convolution
    halves the resolution and the output is up-sampled by nearest neighbour: four times fewer
    operations, for a perturbation that the dimension reducer makes coarse anyway.
    """

    def __init__(self, width: int, depth: int, in_channels: int = 3, stride: int = 1, norm: str = "instance"):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        self.encoder = nn.Sequential(
            conv_block(in_channels, width, 7, stride, norm),
            conv_block(width, 2 * width, 3, 2, norm),
            conv_block(2 * width, 4 * width, 3, 2, norm),
        )
        self.bottleneck = nn.Sequential(*[ResidualBlock(4 * width, norm) for _ in range(depth)])
        self.decoder = nn.Sequential(
            up_block(4 * width, 2 * width, norm),
            up_block(2 * width, width, norm),
            nn.Conv2d(width, 3, 7, padding=3, padding_mode="reflect"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, ENCODER_STRIDE * self.stride)
        out = self.decoder(self.bottleneck(self.encoder(x)))
        if self.stride > 1:
            out = F.interpolate(out, scale_factor=self.stride, mode="nearest")
        return out[..., :height, :width]


class Discriminator(nn.Module):
    """PatchGAN critic with spectral normalisation: one realness score per patch.

    The spectral norm bounds D's Lipschitz constant, so an ε-small perturbation can only move its
    score a little. Without it D soon separates clean from protected images perfectly (an 8/255
    pattern is easy to detect), and λ1·L_G_dis then outweighs the attack and recovery terms.
    """

    def __init__(self, width: int):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(3, width, 4, 2, 1)),
            nn.LeakyReLU(0.2, inplace=True),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)),
            nn.LeakyReLU(0.2, inplace=True),
            sn(nn.Conv2d(2 * width, 4 * width, 3, 1, 1)),
            nn.LeakyReLU(0.2, inplace=True),
            sn(nn.Conv2d(4 * width, 1, 3, 1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pads bottom/right up to a multiple, and to at least two multiples so that the bottleneck
    stays 2 pixels wide (reflect padding inside the blocks needs that)."""
    height, width = x.shape[-2:]
    pad_h = max(-height % multiple, 2 * multiple - height)
    pad_w = max(-width % multiple, 2 * multiple - width)
    if not (pad_h or pad_w):
        return x
    # reflect padding needs the padding smaller than the side; replicate covers tiny inputs
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
