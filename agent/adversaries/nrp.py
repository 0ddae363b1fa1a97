"""NRP, the Neural Representation Purifier (Naseer, Khan, Hayat, Khan, Porikli, "A Self-supervised
Approach for Adversarial Robustness", CVPR 2020).

A purifier P learns to undo perturbations without labels and without any attack: each clean batch x
gets a self-supervised perturbation (SSP), an x' in the L∞ ball of radius ε around x that maximises
the distortion ||F(x') − F(x)|| of a surrogate feature network F (random start, sign-gradient
steps). P is then trained on its feature loss ||F(P(x')) − F(x)||, pixel loss ||P(x') − x|| and a
relativistic average GAN loss against a critic D that tells x from P(x'). Because SSP attacks
features rather than one classifier's decision, the purifier carries over to perturbations it was
never trained on, which is why an attacker would try it on protected photos.

Differences from the paper:
- P is a small residual net (a convolution, a few residual blocks, an output convolution whose
  result is added to the input) rather than the paper's stack of residual-in-residual dense
  blocks: the CPU budget. D is `agent.rgan.nets.Discriminator`.
- P's output layer starts at zero, so P starts as the identity (see `NRP`).
- Weights: feature 1 (the main term, as in the paper), critic 5e-3 (the paper's α). The pixel loss
  is measured in units of ε² (as the RGAN losses are) with weight 0.1: on CIFAR with ResNet-20's
  mid-level features an SSP costs ~0.9 in features and ~0.7 in these pixel units, so the feature
  term carries most of the gradient, as in the paper, while the pixel term still counts: this
  attacker is also scored on its PSNR to the original.
- Distortions are mean squared errors (squared L2 norms): the sign steps are the same, and the
  loss is smooth at zero.
- The paper's min-max training also maximises the feature distortion measured after purification.
  Here that "max step" is `purifier_steps` further sign steps from the SSP, inside the same ε ball,
  that increase ||F(P(x')) − F(x)|| for the current P: P then trains on the inputs it currently
  purifies worst, not only on ones that are bad for F alone. This is our reading of the paper's
  max step, not a copy of its code.
- Fewer SSP steps (5 of size ε/4 from a uniform start) than a long PGD: each costs a pass through
  F on a CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..rgan.nets import Discriminator, ResidualBlock, conv_block, pad_to_multiple
from .pairs import PairSource


class NRP(nn.Module):
    """Purifier: image → clean estimate in [0, 1]. It predicts a correction added to its input,
    starting at zero: P starts as the identity, which is already a fair estimate of the clean image,
    and only has to learn what a perturbation changed (from a random start, a few dozen steps
    leave it worse than doing nothing)."""

    def __init__(self, width: int = 16, depth: int = 4):
        super().__init__()
        self.head = conv_block(3, width, 3, 1)
        self.body = nn.Sequential(*[ResidualBlock(width) for _ in range(depth)])
        self.tail = nn.Conv2d(width, 3, 3, padding=1, padding_mode="reflect")
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # there is no down-sampling, but reflect padding and instance norm need a few pixels
        padded = pad_to_multiple(x, 2)
        correction = self.tail(self.body(self.head(padded)))
        return (padded + correction)[..., :height, :width].clamp(0, 1)


def _ascend(
    net: Callable[[torch.Tensor], torch.Tensor],
    clean: torch.Tensor,
    target: torch.Tensor,
    start: torch.Tensor,
    epsilon: float,
    steps: int,
    step: float,
) -> torch.Tensor:
    """Sign-gradient ascent of ||net(x') − target||² from `start`, projected onto the ε ball around
    `clean` and onto [0, 1]."""
    adversarial = start.detach()
    with torch.enable_grad():
        for _ in range(steps):
            adversarial.requires_grad_(True)
            distortion = F.mse_loss(net(adversarial), target)
            # the gradient is taken for the input only, so no network accumulates one
            (gradient,) = torch.autograd.grad(distortion, adversarial)
            adversarial = adversarial.detach() + step * gradient.sign()
            adversarial = torch.minimum(torch.maximum(adversarial, clean - epsilon), clean + epsilon).clamp(0, 1)
    return adversarial.detach()


def make_ssp(
    feature_net: nn.Module,
    clean: torch.Tensor,
    *,
    epsilon: float = 16 / 255,
    steps: int = 5,
    step: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Self-supervised perturbation of `clean` (no labels): from clean + uniform noise in [−ε, ε],
    `steps` sign steps (of `step`, default ε/4) that increase ||F(x') − F(clean)||, each projected
    back into the ε ball and [0, 1]. `generator` draws the noise (torch's global RNG if None)."""
    noise = (2 * torch.rand(clean.shape, generator=generator) - 1).to(clean.device) * epsilon
    with torch.no_grad():
        target = feature_net(clean)
    start = (clean + noise).clamp(0, 1)
    return _ascend(feature_net, clean, target, start, epsilon, steps, epsilon / 4 if step is None else step)


def _relativistic_losses(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relativistic average GAN: (critic loss, purifier loss). Each score is judged against the
    other side's mean, so P is pushed both to look real and to make clean images look less so."""
    real_vs_fake = real - fake.mean()
    fake_vs_real = fake - real.mean()
    bce = F.binary_cross_entropy_with_logits
    critic = 0.5 * (bce(real_vs_fake, torch.ones_like(real)) + bce(fake_vs_real, torch.zeros_like(fake)))
    purifier = 0.5 * (bce(real_vs_fake, torch.zeros_like(real)) + bce(fake_vs_real, torch.ones_like(fake)))
    return critic, purifier


def train_nrp(
    pairs: PairSource,
    steps: int,
    *,
    feature_net: nn.Module,
    epsilon: float = 16 / 255,
    ssp_steps: int = 5,
    purifier_steps: int = 1,
    batch_size: int = 16,
    lr: float = 1e-4,
    seed: int = 0,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    width: int = 16,
    depth: int = 4,
    feature_weight: float = 1.0,
    pixel_weight: float = 0.1,
    critic_weight: float = 5e-3,
) -> tuple[NRP, dict]:
    """Trains NRP for `steps` batches. Only the CLEAN half of `pairs` is used: SSP makes its own
    perturbations. `feature_net` is a frozen surrogate (e.g. `agent.classifiers.feature_extractor`);
    `purifier_steps` is the max step on P's output (0 leaves it out).

    info: "losses" (P's total loss per step), "feature_losses", "pixel_losses", "critic_losses"
    (D's loss), "steps", "seconds"."""
    torch.manual_seed(seed)
    purifier = NRP(width, depth).to(device).train()
    critic = Discriminator(width).to(device).train()
    feature_net = feature_net.to(device)
    optimizer_p = torch.optim.Adam(purifier.parameters(), lr=lr, betas=(0.5, 0.999))
    optimizer_d = torch.optim.Adam(critic.parameters(), lr=lr, betas=(0.5, 0.999))
    generator = torch.Generator().manual_seed(seed)
    info: dict = {"losses": [], "feature_losses": [], "pixel_losses": [], "critic_losses": []}
    started = time.perf_counter()
    for step in range(steps):
        clean = pairs.batch(batch_size, generator)[0].to(device)
        adversarial = make_ssp(feature_net, clean, epsilon=epsilon, steps=ssp_steps, generator=generator)
        with torch.no_grad():
            target = feature_net(clean)
        adversarial = _ascend(lambda x: feature_net(purifier(x)), clean, target, adversarial, epsilon,
                              purifier_steps, epsilon / 4)

        purified = purifier(adversarial)
        feature_loss = F.mse_loss(feature_net(purified), target)
        pixel_loss = F.mse_loss(purified, clean) / epsilon**2
        _, adversarial_loss = _relativistic_losses(critic(clean), critic(purified))
        loss = feature_weight * feature_loss + pixel_weight * pixel_loss + critic_weight * adversarial_loss
        optimizer_p.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_p.step()

        critic_loss, _ = _relativistic_losses(critic(clean), critic(purified.detach()))
        # P's backward also reached D's weights; those gradients are not D's own objective
        optimizer_d.zero_grad(set_to_none=True)
        critic_loss.backward()
        optimizer_d.step()

        info["losses"].append(loss.item())
        info["feature_losses"].append(feature_loss.item())
        info["pixel_losses"].append(pixel_loss.item())
        info["critic_losses"].append(critic_loss.item())
        if on_step:
            on_step(step, loss.item())
    info.update(steps=steps, seconds=time.perf_counter() - started)
    purifier = purifier.cpu().eval().requires_grad_(False)
    return purifier, info
