"""The Wasserstein GAN critic's gradient penalty (Gulrajani et al. 2017), shared by the attackers
that train a WGAN-GP critic (APE-GAN++, Defense-GAN)."""

from __future__ import annotations

from typing import Callable

import torch


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """(‖∇critic‖₂ − 1)² at random points between real and fake images, one per image; the critic
    must score each image on its own (no batch norm) for the penalty to mean anything."""
    mix = torch.rand(len(real), 1, 1, 1, generator=generator).to(real.device)
    between = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (gradient,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
    return (gradient.flatten(1).norm(dim=1) - 1).pow(2).mean()
