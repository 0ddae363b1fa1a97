import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from agent import metrics
from agent.rgan import losses


def test_cw_margin_sign_and_floor():
    labels = torch.tensor([0, 0])
    correct = torch.tensor([[5.0, 1.0, 0.0], [3.0, 2.0, 0.0]])
    fooled = torch.tensor([[1.0, 3.0, 0.0], [0.0, 20.0, 0.0]])
    assert losses.cw_margin(correct, labels, kappa=5) == pytest.approx((4 + 1) / 2)
    # misclassified: negative, floored at -kappa for the confident one
    assert losses.cw_margin(fooled, labels, kappa=5) == pytest.approx((-2 - 5) / 2)


def test_cw_margin_gradient_vanishes_once_fooled_beyond_kappa():
    logits = torch.tensor([[0.0, 10.0]], requires_grad=True)
    losses.cw_margin(logits, torch.tensor([0]), kappa=5).backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_distortion_is_one_at_the_full_budget():
    eps = 8 / 255
    x = torch.rand(2, 3, 8, 8)
    assert losses.distortion(x + eps, x, eps).item() == pytest.approx(1.0, rel=1e-4)
    assert losses.distortion(x, x, eps).item() == 0


def test_gan_losses_reward_the_right_side():
    real, fake = torch.ones(4, 1, 2, 2), torch.zeros(4, 1, 2, 2)
    assert losses.discriminator(real, fake).item() == 0  # a perfect critic
    assert losses.discriminator(fake, real).item() == pytest.approx(1.0)
    assert losses.generator_dis(real).item() == 0  # G fully fools D
    assert losses.generator_dis(fake).item() == pytest.approx(1.0)


def test_recover_adv_is_cross_entropy():
    logits = torch.tensor([[0.0, 0.0]])
    assert losses.recover_adv(logits, torch.tensor([1])).item() == pytest.approx(math.log(2))


def test_psnr_and_l2_of_a_known_error():
    x = torch.full((1, 3, 10, 10), 0.5)
    y = x + 1 / 255
    assert metrics.psnr(y, x).item() == pytest.approx(20 * math.log10(255), abs=1e-3)  # 48.13 dB
    assert metrics.l2(y, x).item() == pytest.approx(math.sqrt(300) / 255, rel=1e-5)
    assert metrics.psnr(x, x).item() == metrics.PSNR_CAP


def test_ssim_is_one_for_identical_images_and_matches_scikit_image():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    y = (x + 0.05 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    assert metrics.ssim(x, x) == pytest.approx([1.0, 1.0])
    ours = metrics.ssim(y, x)
    for i in range(2):
        reference = structural_similarity(
            y[i].permute(1, 2, 0).numpy(), x[i].permute(1, 2, 0).numpy(), channel_axis=2,
            data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        # scikit-image crops a border of (win-1)/2 = 5 after filtering with padding, which
        # equals our valid-window mean
        assert ours[i].item() == pytest.approx(reference, abs=1e-6)


def test_classifier_rates():
    labels = torch.tensor([0, 1, 2, 3])
    clean = torch.tensor([0, 1, 2, 0])
    adv = torch.tensor([1, 1, 0, 2])
    assert metrics.accuracy(clean, labels) == 0.75
    assert metrics.error_rate(adv, labels) == 0.75
    assert metrics.attack_success_rate(adv, clean) == 0.75
    assert np.isclose(metrics.attack_success_rate(clean, clean), 0.0)
