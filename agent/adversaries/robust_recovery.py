"""Robust Recovery (Bana, Loya, Kulkarni, "Robust Recovery of Adversarial Examples", ICML 2021
workshop): an attention U-Net that recovers the clean image from an adversarial one.

Our reading of the architecture:
- Encoder of convolution blocks, halving the size three times. Decoder up-sampling by sub-pixel
  convolution (PixelShuffle); each skip connection passes an additive attention gate (Oktay et al.)
  driven by the coarser decoder features, so the decoder takes only the parts of the encoder's
  features that its current estimate asks for.
- A SAGAN self-attention layer at the start of the decoder, on the lowest resolution, with the
  learnable γ at 0: the network starts as a plain U-Net and mixes in global context as it learns to.
- Two heads on the last decoder features: noise reconstruction (a bounded estimate n of the
  perturbation, giving x − n) and image reconstruction (the clean image through a sigmoid).
- Residual cross-attention output: a per-pixel map a, computed from the decoder features together
  with the input, weights the two, out = a·image + (1 − a)·(x − n). Where the perturbation is
  plain additive noise the residual path keeps the input's detail exactly; where it is
  structured the image head redraws the pixels.

Training: L1(out, clean) + an L1 on each head's own estimate (so both stay meaningful, not just
their mix) + an LSGAN (MSE) adversarial loss against the repository's PatchGAN `Discriminator` +
the classifier's cross-entropy on `out` against its own prediction on the clean image (the
attacker has no labels); then a post-training phase on the feature loss
L1(feature_net(out), feature_net(clean)) plus L1(out, clean).

Differences from the paper, and why:
- The networks are narrow (width 16 by default) so that they train on a CPU.
- The self-attention's keys and values are max-pooled to at most 32×32 positions (BigGAN pools
  them by 2), so memory grows with the image area rather than with its square: large photos fit.
- The per-head L1 terms are ours: without them one head could go unused behind the mix.
- Post-training keeps the pixel L1 beside the feature loss: alone, the feature loss let the pixels
  drift (CIFAR crops with 8/255 sign noise, ResNet-20 features, 300 + 75 steps: held-out MSE
  0.00285 before post-training, 0.00336 after it on the feature loss alone, 0.00187 with the L1).
- The loss weights are ours, not the paper's: adversarial 0.01 relative to L1 (pix2pix's 1 : 100),
  classification 0.01 so that a confused classifier's cross-entropy cannot outweigh fidelity.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, NamedTuple

import torch
from torch import nn
import torch.nn.functional as F

from ..classifiers import freeze
from ..rgan.nets import Discriminator, conv_block, norm_layer, pad_to_multiple
from .pairs import PairSource

# three halvings in the encoder
TOTAL_STRIDE = 8
ATTENTION_MAX_SIDE = 32


class AttentionGate(nn.Module):
    """Oktay et al.'s additive gate: skip features scaled by a [0, 1] map computed from them and the
    coarser decoder features (the gating signal), at the gating resolution and then up-sampled."""

    def __init__(self, skip_channels: int, gate_channels: int):
        super().__init__()
        inner = max(1, skip_channels // 2)
        self.skip = nn.Conv2d(skip_channels, inner, 2, stride=2)
        self.gate = nn.Conv2d(gate_channels, inner, 1)
        self.score = nn.Conv2d(inner, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        attention = torch.sigmoid(self.score(F.relu(self.skip(skip) + self.gate(gate))))
        return skip * F.interpolate(attention, size=skip.shape[-2:], mode="bilinear", align_corners=False)


class SelfAttention(nn.Module):
    """SAGAN self-attention, out = x + γ·attention(x), γ learnable from 0."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(1, channels // 8)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pooled = F.adaptive_max_pool2d(x, (min(h, ATTENTION_MAX_SIDE), min(w, ATTENTION_MAX_SIDE)))
        query = self.query(x).flatten(2).transpose(1, 2)  # (n, h·w, inner)
        key = self.key(pooled).flatten(2)  # (n, inner, m)
        value = self.value(pooled).flatten(2)  # (n, c, m)
        attention = torch.softmax(query @ key, dim=-1)  # (n, h·w, m)
        return x + self.gamma * (value @ attention.transpose(1, 2)).view(n, c, h, w)


def down_level(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(conv_block(c_in, c_out, 3, 2), conv_block(c_out, c_out, 3, 1))


class UpLevel(nn.Module):
    """PixelShuffle up-sampling, gated skip connection, fusion."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.up = nn.Sequential(
            nn.Conv2d(c_in, 4 * c_out, 3, padding=1, padding_mode="reflect"),
            nn.PixelShuffle(2),
            norm_layer("instance", c_out),
            nn.ReLU(inplace=True),
        )
        self.gate = AttentionGate(c_out, c_in)
        self.fuse = conv_block(2 * c_out, c_out, 3, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.gate(skip, x), self.up(x)], dim=1))


class Reconstruction(NamedTuple):
    noise: torch.Tensor  # the perturbation estimate n
    image: torch.Tensor  # the image head's clean estimate
    mix: torch.Tensor  # the cross-attention weight a of the image head, (N, 1, H, W)
    output: torch.Tensor  # a·image + (1 − a)·(x − n), in [0, 1]


class RobustRecovery(nn.Module):
    """The attention U-Net; `reconstruct` gives both heads and the mix, `forward` the output."""

    def __init__(self, width: int = 16, max_noise: float = 0.25):
        super().__init__()
        self.max_noise = max_noise
        self.stem = conv_block(3, width, 3, 1)
        levels = [(width, 2 * width), (2 * width, 4 * width), (4 * width, 8 * width)]  # (finer, coarser)
        self.down = nn.ModuleList([down_level(fine, coarse) for fine, coarse in levels])
        self.self_attention = SelfAttention(8 * width)
        self.up = nn.ModuleList([UpLevel(coarse, fine) for fine, coarse in reversed(levels)])
        self.noise_head = nn.Conv2d(width, 3, 3, padding=1, padding_mode="reflect")
        self.image_head = nn.Conv2d(width, 3, 3, padding=1, padding_mode="reflect")
        self.mix_head = nn.Conv2d(width + 3, 1, 3, padding=1, padding_mode="reflect")

    def reconstruct(self, x: torch.Tensor) -> Reconstruction:
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, TOTAL_STRIDE)
        features = [self.stem(2 * padded - 1)]
        for level in self.down:
            features.append(level(features[-1]))
        out = self.self_attention(features.pop())
        for level in self.up:
            out = level(out, features.pop())
        noise = self.max_noise * torch.tanh(self.noise_head(out))
        image = torch.sigmoid(self.image_head(out))
        mix = torch.sigmoid(self.mix_head(torch.cat([out, padded], dim=1)))
        output = (mix * image + (1 - mix) * (padded - noise)).clamp(0, 1)
        crop = (..., slice(0, height), slice(0, width))
        return Reconstruction(noise[crop], image[crop], mix[crop], output[crop])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x).output


def train_robust_recovery(
    pairs: PairSource,
    steps: int,
    *,
    classifier: nn.Module,
    feature_net: nn.Module,
    post_steps: int | None = None,
    batch_size: int = 16,
    lr: float = 2e-4,
    seed: int = 0,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    width: int = 16,
    adversarial_weight: float = 0.01,
    classification_weight: float = 0.01,
) -> tuple[RobustRecovery, dict]:
    """Main phase of `steps` steps, then `post_steps` (default steps // 4) on the feature loss and
    the pixel L1; Adam with pix2pix's betas (0.5, 0.999). `on_step` sees both phases' steps,
    numbered on.

    info: "losses" (total generator loss), "l1" (L1 of the output to clean), "discriminator_losses"
    per main step; "feature_losses" per post-training step.
    """
    post_steps = steps // 4 if post_steps is None else post_steps
    torch.manual_seed(seed)
    recovery = RobustRecovery(width).to(device)
    discriminator = Discriminator(width).to(device)
    # private copies: moving the caller's networks to `device` would surprise them
    classifier = freeze(copy.deepcopy(classifier).to(device))
    feature_net = freeze(copy.deepcopy(feature_net).to(device))
    g_optimizer = torch.optim.Adam(recovery.parameters(), lr=lr, betas=(0.5, 0.999))
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    batches = torch.Generator().manual_seed(seed)
    info: dict = {"losses": [], "l1": [], "discriminator_losses": [], "feature_losses": []}
    started = time.perf_counter()
    for step in range(steps):
        clean, adversarial = (t.to(device) for t in pairs.batch(batch_size, batches))
        with torch.no_grad():
            own_labels = classifier(clean).argmax(1)
        parts = recovery.reconstruct(adversarial)

        real_scores, fake_scores = discriminator(clean), discriminator(parts.output.detach())
        d_loss = 0.5 * (F.mse_loss(real_scores, torch.ones_like(real_scores))
                        + F.mse_loss(fake_scores, torch.zeros_like(fake_scores)))
        d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optimizer.step()

        l1 = F.l1_loss(parts.output, clean)
        heads = F.l1_loss(adversarial - parts.noise, clean) + F.l1_loss(parts.image, clean)
        scores = discriminator(parts.output)
        adversarial_loss = F.mse_loss(scores, torch.ones_like(scores))
        classification = F.cross_entropy(classifier(parts.output), own_labels)
        loss = l1 + heads + adversarial_weight * adversarial_loss + classification_weight * classification
        g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        g_optimizer.step()

        info["losses"].append(loss.item())
        info["l1"].append(l1.item())
        info["discriminator_losses"].append(d_loss.item())
        if on_step:
            on_step(step, loss.item())

    # a fresh optimiser: Adam's moments belong to the main phase's objective
    post_optimizer = torch.optim.Adam(recovery.parameters(), lr=lr, betas=(0.5, 0.999))
    for step in range(post_steps):
        clean, adversarial = (t.to(device) for t in pairs.batch(batch_size, batches))
        recovered = recovery(adversarial)
        feature_loss = F.l1_loss(feature_net(recovered), feature_net(clean))
        post_optimizer.zero_grad(set_to_none=True)
        (feature_loss + F.l1_loss(recovered, clean)).backward()
        post_optimizer.step()
        info["feature_losses"].append(feature_loss.item())
        if on_step:
            on_step(steps + step, feature_loss.item())
    info.update(steps=steps, post_steps=post_steps, seconds=time.perf_counter() - started)
    return recovery.cpu().eval().requires_grad_(False), info
