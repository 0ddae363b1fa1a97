"""The RGAN's losses (paper §3.3, eq. 8–14).

Distortion losses are mean squared errors divided by epsilon², so that a perturbation using the
whole L-infinity budget at every pixel costs 1 whatever the image size; this keeps λ1 = 10 and
λ2 = 1 meaningful from 32-px CIFAR images to full-size photos.

L_G_adv is the untargeted C&W margin (as in AdvGAN): max(Z_y − max_{j≠y} Z_j, −κ), where y is the
classifier's prediction on the clean image. Unlike a negated cross-entropy it is bounded below,
so it converges: once an image is misclassified with margin κ it stops pulling, and G's capacity
goes to the images not yet fooled and to the distortion and recoverability terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cw_margin(logits: torch.Tensor, labels: torch.Tensor, kappa: float) -> torch.Tensor:
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    margin = true_logit - others.amax(dim=1)
    return margin.clamp(min=-kappa).mean()


def distortion(image: torch.Tensor, reference: torch.Tensor, epsilon: float) -> torch.Tensor:
    """L_G_mse (eq. 11) and L_R_mse (eq. 12): MSE in units of the perturbation budget."""
    return F.mse_loss(image, reference) / epsilon**2


def generator_dis(fake_scores: torch.Tensor) -> torch.Tensor:
    """L_G_dis (eq. 10), least-squares GAN: G wants D to call its images real."""
    return F.mse_loss(fake_scores, torch.ones_like(fake_scores))


def discriminator(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """L_D (eq. 14), least-squares GAN."""
    return 0.5 * (
        F.mse_loss(real_scores, torch.ones_like(real_scores))
        + F.mse_loss(fake_scores, torch.zeros_like(fake_scores))
    )


def recover_adv(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_R_adv (eq. 13): the recovered image should be classified as the clean one was."""
    return F.cross_entropy(logits, labels)
