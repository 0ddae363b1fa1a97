"""Defense-GAN (Samangouei, Kabkab, Chellappa, "Defense-GAN: Protecting Classifiers Against
Adversarial Attacks Using Generative Models", ICLR 2018).

A generator G learns the distribution of CLEAN images only (a Wasserstein GAN). At test time each
input x is projected onto G's range: z* = argmin_z ||G(z) − x||², found by L steps of gradient
descent from R random latents, keeping the restart that ends closest to x; the output is G(z*).
A perturbation off the clean-image manifold has no latent that reproduces it, so it is left out.

Differences from the paper:
- WGAN-GP (Gulrajani et al. 2017: gradient penalty 10, n_critic 5, Adam β = (0.5, 0.9)) instead
  of the paper's WGAN, because weight clipping trains unstably; a DCGAN-style generator (batch
  norm, transposed convolutions) and a small convolutional critic, narrow for a CPU.
- The projection uses Adam, whose step does not depend on the scale of ||G(z) − x||², with the
  paper's decaying step: the rate falls geometrically to a tenth over the L steps.
- The paper works at its data's native size (28 px MNIST, 64 px CelebA). Here G has one size
  (a power of two: 32 for CIFAR, 64 for photos on a CPU budget); an input of another size is
  downscaled (antialiased, aspect ratio not kept) to `size`×`size`, projected, and G(z*) is
  upscaled back. On photos this throws away all detail finer than the `size` grid, which is the
  method's nature at this budget: a GAN's range cannot hold a full-resolution photo.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..rgan.nets import up_block
from .pairs import PairSource
from .wgan import gradient_penalty


def _levels(size: int) -> int:
    """Doublings from the 4×4 seed map to `size`."""
    if size < 8 or size & (size - 1):
        raise ValueError(f"size must be a power of two of at least 8, got {size}")
    return int(math.log2(size)) - 2


class Generator(nn.Module):
    """DCGAN generator: latent → 4×4 map → transposed-convolution doublings → `size`² image in
    [0, 1]. Batch norm, as in DCGAN: in eval mode it is a fixed affine map, so the latents of a
    projection batch do not interact."""

    def __init__(self, latent: int, size: int, width: int):
        super().__init__()
        levels = _levels(size)
        channels = [width * 2 ** (levels - i) for i in range(levels + 1)]
        self.seed = nn.Sequential(
            nn.Linear(latent, channels[0] * 16),
            nn.Unflatten(1, (channels[0], 4, 4)),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        self.up = nn.Sequential(*[up_block(channels[i], channels[i + 1], "batch") for i in range(levels)])
        self.out = nn.Conv2d(channels[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.up(self.seed(z))))


class Critic(nn.Module):
    """WGAN-GP critic: stride-2 convolutions down to 4×4, then one score per image. No
    normalisation, since the gradient penalty is taken per image."""

    def __init__(self, size: int, width: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for level in range(_levels(size)):
            layers += [nn.Conv2d(channels, width * 2**level, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            channels = width * 2**level
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


class DefenseGan(nn.Module):
    """Holds G; forward(x) = G(z*), the projection of x onto G's range (any input size, see the
    module docstring). `projection_steps` (L) and `restarts` (R) are plain attributes, to be set
    for the time budget. Restarts are drawn from `seed`, so a projection is deterministic."""

    def __init__(
        self,
        latent: int = 64,
        size: int = 32,
        width: int = 16,
        projection_steps: int = 200,
        restarts: int = 10,
        projection_lr: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        self.latent = latent
        self.size = size
        self.projection_steps = projection_steps
        self.restarts = restarts
        self.projection_lr = projection_lr
        self.seed = seed
        self.generator = Generator(latent, size, width)

    def initial_latents(self, count: int) -> torch.Tensor:
        """(count, restarts, latent) starting points, from the module's seed and not the global
        RNG, so that purifying the same batch twice gives the same result."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(count, self.restarts, self.latent, generator=generator)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x at `size`×`size` → (z*, its mean squared error per image)."""
        count = len(x)
        target = x.repeat_interleave(self.restarts, dim=0)
        z = self.initial_latents(count).flatten(0, 1).to(x.device).requires_grad_(True)
        # Adam is per coordinate, so optimising all restarts together is R independent descents
        optimizer = torch.optim.Adam([z], lr=self.projection_lr)
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.1 ** (1 / max(self.projection_steps, 1)))
        with torch.enable_grad():
            for _ in range(self.projection_steps):
                errors = (self.generator(z) - target).pow(2).flatten(1).mean(1)
                # the gradient goes to z only, even where G's weights still require one
                (z.grad,) = torch.autograd.grad(errors.sum(), z)
                optimizer.step()
                decay.step()
        with torch.no_grad():
            errors = (self.generator(z) - target).pow(2).flatten(1).mean(1).view(count, self.restarts)
        best = errors.argmin(1)
        rows = torch.arange(count, device=x.device)
        return z.detach().view(count, self.restarts, -1)[rows, best], errors[rows, best]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        z, _ = self.project(_resize(x, self.size, self.size))
        with torch.no_grad():
            return _resize(self.generator(z), height, width).clamp(0, 1)


def train_defense_gan(
    pairs: PairSource,
    steps: int,
    *,
    size: int = 32,
    latent: int = 64,
    width: int = 16,
    batch_size: int = 16,
    lr: float = 1e-4,
    n_critic: int = 5,
    penalty_weight: float = 10.0,
    seed: int = 0,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[DefenseGan, dict]:
    """Trains the WGAN-GP on the CLEAN half of `pairs` (resized to `size` if the crops differ):
    each step is `n_critic` critic updates, each on a fresh batch, then one generator update.

    info: "losses" (the critic's Wasserstein estimate E[D(real)] − E[D(fake)] per step, averaged
    over its n_critic updates: it tracks how far G's images are from real ones), "critic_losses"
    (the critic's loss, −estimate + penalty), "generator_losses", "steps", "seconds"."""
    torch.manual_seed(seed)
    gan = DefenseGan(latent=latent, size=size, width=width, seed=seed)
    generator_net = gan.generator.to(device).train()
    critic = Critic(size, width).to(device).train()
    optimizer_g = torch.optim.Adam(generator_net.parameters(), lr=lr, betas=(0.5, 0.9))
    optimizer_c = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.9))
    batches = torch.Generator().manual_seed(seed)

    def noise() -> torch.Tensor:
        return torch.randn(batch_size, latent, generator=batches).to(device)

    info: dict = {"losses": [], "critic_losses": [], "generator_losses": []}
    started = time.perf_counter()
    for step in range(steps):
        estimates, critic_losses = [], []
        for _ in range(n_critic):
            real = _resize(pairs.batch(batch_size, batches)[0], size, size).to(device)
            with torch.no_grad():
                fake = generator_net(noise())
            estimate = critic(real).mean() - critic(fake).mean()
            critic_loss = -estimate + penalty_weight * gradient_penalty(critic, real, fake, batches)
            optimizer_c.zero_grad(set_to_none=True)
            critic_loss.backward()
            optimizer_c.step()
            estimates.append(estimate.item())
            critic_losses.append(critic_loss.item())

        generator_loss = -critic(generator_net(noise())).mean()
        optimizer_g.zero_grad(set_to_none=True)
        generator_loss.backward()
        optimizer_g.step()

        info["losses"].append(sum(estimates) / n_critic)
        info["critic_losses"].append(sum(critic_losses) / n_critic)
        info["generator_losses"].append(generator_loss.item())
        if on_step:
            on_step(step, info["losses"][-1])
    info.update(steps=steps, seconds=time.perf_counter() - started)
    gan.zero_grad(set_to_none=True)
    gan = gan.cpu().eval().requires_grad_(False)
    return gan, info
