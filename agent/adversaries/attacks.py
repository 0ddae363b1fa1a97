"""White-box, untargeted attacks on a classifier, for the paper's Table 3 and for purifiers' training
pairs (`AttackPairs`): FGSM (Goodfellow et al. 2015), L∞ PGD (Madry et al. 2018), DDN, "Decoupling
Direction and Norm" (Rony et al., CVPR 2019) and C&W L2 (Carlini & Wagner, S&P 2017).

Every attack is `attack(classifier, images, labels, **options) -> adversarial` on [0, 1] images of
any size; `labels` is the class to move away from. Results are detached and on the 8-bit grid, as a
saved photo is. Differences from the papers, all for the sake of CPU time and of 8-bit output:
- PGD and FGSM round onto the 8-bit grid inside the ε-ball, so the bound holds exactly after
  rounding.
- DDN and C&W keep, per image, the smallest perturbation whose *rounded* image is adversarial, so
  rounding never undoes a success they report; an image never fooled is returned clean (rounded),
  as in the authors' releases.
- DDN anneals its step by a cosine from `step` to `step / 100`, as Rony et al.'s release does.
- C&W runs `binary_search_steps` × `steps` Adam steps (default 3 × 100 = 300 gradient evaluations
  per batch, against the paper's 9 × 10 000): a coarse search over c that starts at c = 1.

Cost of the defaults on one CPU core (each step is a forward and backward pass, plus a forward pass
to judge the rounded image for DDN and C&W): PGD 10 steps, DDN 50, C&W 300; C&W takes about 40 s
per 224-px image on MobileNetV2 and about 2 s per CIFAR-10 image on ResNet-20.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 255


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    return torch.round(images.clamp(0, 1) * LEVELS) / LEVELS


def _round_within(adversarial: torch.Tensor, clean: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The 8-bit image nearest to `adversarial` that stays within `epsilon` (L∞) of `clean`: plain
    rounding could step up to half a level past the bound. Needs 2ε ≥ 1/255, so that the ball
    holds a grid point. The slack absorbs float error in the product with 255, so grid points
    exactly on the bound are kept."""
    low = torch.ceil(((clean - epsilon).clamp(0, 1) * LEVELS) - 1e-4) / LEVELS
    high = torch.floor(((clean + epsilon).clamp(0, 1) * LEVELS) + 1e-4) / LEVELS
    return torch.minimum(torch.maximum(to_8bit(adversarial), low), high)


def _input_gradient(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed cross-entropy, so each image's gradient is independent of the batch;
    taken with respect to the input only, so the classifier's parameters are never touched."""
    with torch.enable_grad():
        images = images.detach().requires_grad_(True)
        loss = F.cross_entropy(classifier(images), labels, reduction="sum")
        return torch.autograd.grad(loss, images)[0]


def _fooled(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return classifier(images).argmax(1) != labels


def _l2(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).norm(dim=1)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def fgsm(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epsilon: float = 8 / 255
) -> torch.Tensor:
    step = images + epsilon * _input_gradient(classifier, images, labels).sign()
    return _round_within(step.clamp(0, 1), images, epsilon).detach()


def pgd(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float = 8 / 255,
    step: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L∞ PGD from a uniform random start in the ε-ball. Without a `generator`, the start comes
    from a fixed seed, so an evaluation is reproducible."""
    clean = images.detach()
    adversarial = clean
    if random_start:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        noise = torch.rand(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)
        adversarial = (clean + (2 * noise - 1) * epsilon).clamp(0, 1)
    for _ in range(steps):
        adversarial = adversarial + step * _input_gradient(classifier, adversarial, labels).sign()
        adversarial = torch.minimum(torch.maximum(adversarial, clean - epsilon), clean + epsilon).clamp(0, 1)
    return _round_within(adversarial, clean, epsilon).detach()


def ddn(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 50,
    init_norm: float = 1.0,
    gamma: float = 0.05,
    step: float = 1.0,
) -> torch.Tensor:
    """DDN (L2): a gradient step of fixed length α sets the direction, and the norm ε shrinks by
    (1 − γ) while the image is adversarial and grows by (1 + γ) while it is not, so ε settles on
    the decision boundary."""
    clean = images.detach()
    count = len(clean)
    delta = torch.zeros_like(clean)
    norm = torch.full((count,), init_norm, dtype=clean.dtype, device=clean.device)
    best = to_8bit(clean)
    best_l2 = torch.full((count,), math.inf, dtype=clean.dtype, device=clean.device)
    for k in range(steps):
        alpha = step * (0.01 + 0.99 * (1 + math.cos(math.pi * k / steps)) / 2)
        adversarial = (clean + delta).clamp(0, 1)
        rounded = to_8bit(adversarial)
        fooled = _fooled(classifier, rounded, labels)
        l2 = _l2(rounded - clean)
        better = fooled & (l2 < best_l2)
        best = torch.where(_per_image(better), rounded, best)
        best_l2 = torch.where(better, l2, best_l2)

        gradient = _input_gradient(classifier, adversarial, labels)
        delta = delta + alpha * gradient / _per_image(_l2(gradient).clamp_min(1e-12))
        norm = torch.where(fooled, norm * (1 - gamma), norm * (1 + gamma))
        delta = delta * _per_image(norm / _l2(delta).clamp_min(1e-12))
        # the clipped image is what the classifier sees next, so δ follows it
        delta = (clean + delta).clamp(0, 1) - clean
    rounded = to_8bit(clean + delta)
    fooled, l2 = _fooled(classifier, rounded, labels), _l2(rounded - clean)
    better = fooled & (l2 < best_l2)
    return torch.where(_per_image(better), rounded, best).detach()


def _margin(logits: torch.Tensor, labels: torch.Tensor, kappa: float) -> torch.Tensor:
    """C&W's f6: how far the true class's logit stands above the best other one, floored at −κ."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], -math.inf).amax(1)
    return (true - others).clamp_min(-kappa)


def carlini_wagner(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 100,
    c: float = 1.0,
    kappa: float = 0.0,
    lr: float = 0.01,
    binary_search_steps: int = 3,
) -> torch.Tensor:
    """C&W L2: minimises ‖x' − x‖² + c·f(x') over w with x' = (tanh(w) + 1) / 2 (so x' is always
    a valid image) by Adam, and searches c per image: ×10 after a failure until some c succeeds,
    then bisection between the largest failing and the smallest succeeding c."""
    clean = images.detach()
    count = len(clean)
    lower = torch.zeros(count, dtype=clean.dtype, device=clean.device)
    upper = torch.full((count,), math.inf, dtype=clean.dtype, device=clean.device)
    const = torch.full((count,), c, dtype=clean.dtype, device=clean.device)
    best = to_8bit(clean)
    best_l2 = torch.full((count,), math.inf, dtype=clean.dtype, device=clean.device)
    # scaled so that tanh stays finite at pixels of exactly 0 or 1
    start = torch.atanh((2 * clean - 1) * (1 - 1e-6))
    for _ in range(binary_search_steps):
        w = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=lr)
        succeeded = torch.zeros(count, dtype=torch.bool, device=clean.device)
        for _ in range(steps):
            with torch.enable_grad():
                adversarial = (torch.tanh(w) + 1) / 2
                logits = classifier(adversarial)
                distance = (adversarial - clean).flatten(1).pow(2).sum(1)
                loss = (distance + const * _margin(logits, labels, kappa)).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            # judged on the 8-bit image, so the result stays adversarial once saved
            rounded = to_8bit(adversarial.detach())
            fooled = _fooled(classifier, rounded, labels)
            l2 = _l2(rounded - clean)
            better = fooled & (l2 < best_l2)
            best = torch.where(_per_image(better), rounded, best)
            best_l2 = torch.where(better, l2, best_l2)
            succeeded |= fooled
        upper = torch.where(succeeded, torch.minimum(upper, const), upper)
        lower = torch.where(succeeded, lower, torch.maximum(lower, const))
        const = torch.where(torch.isinf(upper), const * 10, (lower + upper) / 2)
    return best.detach()


# Table 3's order (DDN, PGD, C&W), then FGSM; each with its defaults.
ATTACKS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ddn": ddn,
    "pgd": pgd,
    "cw": carlini_wagner,
    "fgsm": fgsm,
}
