import pytest
import torch

from agent.adversaries.input_transforms import (
    INPUT_TRANSFORMS,
    bit_depth,
    median_3x3,
    random_resize_pad,
    tv_minimisation,
)


def noisy(shape=(2, 3, 24, 20), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def smooth(side=32):
    ramp = torch.linspace(0.2, 0.8, side)
    return torch.stack([ramp[:, None].expand(side, side), ramp[None, :].expand(side, side),
                        (ramp[:, None] + ramp[None, :]).expand(side, side) / 2])[None]


def total_variation(x):
    return (x[..., 1:, :] - x[..., :-1, :]).abs().sum() + (x[..., :, 1:] - x[..., :, :-1]).abs().sum()


def test_the_suite_is_in_its_fixed_order():
    assert list(INPUT_TRANSFORMS) == ["JPEG 75", "bit depth 4", "median 3×3", "TV minimisation", "random resize + pad"]


@pytest.mark.parametrize("name", list(INPUT_TRANSFORMS))
@pytest.mark.parametrize("shape", [(2, 3, 24, 20), (1, 3, 37, 53), (1, 3, 2, 9)])
def test_each_keeps_shape_and_range_and_is_deterministic(name, shape):
    x = noisy(shape)
    transform = INPUT_TRANSFORMS[name]
    out = transform(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, transform(x.clone()))
    assert not torch.equal(out, x)


def test_median_removes_an_isolated_impulse_and_keeps_a_flat_image():
    x = torch.full((1, 3, 9, 9), 0.4)
    assert torch.equal(median_3x3(x), x)
    x[..., 4, 4] = 1.0
    x[..., 0, 0] = 0.0  # at the border too, where reflection supplies the neighbours
    assert torch.allclose(median_3x3(x), torch.full_like(x, 0.4))


def test_median_is_a_true_3x3_median():
    x = noisy((1, 1, 5, 5))
    assert torch.isclose(median_3x3(x)[0, 0, 2, 2], x[0, 0, 1:4, 1:4].median())


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_bit_depth_leaves_at_most_2_to_the_bits_levels(bits):
    out = bit_depth(noisy(), bits)
    assert len(out.unique()) <= 2**bits
    assert (out - noisy()).abs().max() <= 0.5 / (2**bits - 1) + 1e-6


def test_tv_lowers_the_variation_of_noise_and_barely_moves_a_smooth_image():
    clean = smooth()
    noise = 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    noisy_image = (clean + noise).clamp(0, 1)
    out = tv_minimisation(noisy_image)
    assert total_variation(out) < 0.5 * total_variation(noisy_image)
    assert (out - clean).abs().mean() < 0.7 * (noisy_image - clean).abs().mean()
    assert (tv_minimisation(clean) - clean).abs().mean() < 0.01
    # without dropout it is plain TV denoising, and a larger weight smooths more
    assert total_variation(tv_minimisation(noisy_image, weight=0.1, keep=1.0)) < total_variation(
        tv_minimisation(noisy_image, weight=0.02, keep=1.0))


def test_tv_pixel_dropout_follows_the_generator():
    x = noisy()
    first = tv_minimisation(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, tv_minimisation(x, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(first, tv_minimisation(x, generator=torch.Generator().manual_seed(2)))


def test_random_resize_pad_draws_per_image_and_adds_a_black_margin():
    x = torch.ones(4, 3, 40, 40)
    out = random_resize_pad(x)
    assert out.shape == x.shape
    # the canvas's padding shows up as darker pixels along some border of each image
    borders = torch.stack([out[:, :, 0].mean((1, 2)), out[:, :, -1].mean((1, 2)),
                           out[..., 0].mean((1, 2)), out[..., -1].mean((1, 2))], dim=1)
    assert (borders.min(dim=1).values < 0.9).all()
    assert out[:, :, 15:25, 15:25].min() > 0.99
    assert len({tuple(image.flatten().tolist()) for image in out}) > 1
    other = random_resize_pad(x, torch.Generator().manual_seed(5))
    assert torch.equal(other, random_resize_pad(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(other, out)


def test_jpeg_75_changes_a_noisy_image():
    x = noisy()
    out = INPUT_TRANSFORMS["JPEG 75"](x)
    assert (out - x).abs().mean() > 0.02
