import pytest
import torch

from agent.platforms import PLATFORM_TRANSFORMS, resize_long_side
from agent.rgan.transforms import jpeg

NAMES = [
    "none", "Gaussian blur σ=2", "JPEG 95", "JPEG 90", "JPEG 75", "JPEG 70", "centre crop 90%",
    "horizontal flip", "vertical flip", "resize to half", "resize to 1080 px long side",
    "resize to 2048 px long side", "WebP 80", "social pipeline",
]


def noisy(height=30, width=44, count=2, seed=0):
    return torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_the_suite_is_exactly_the_issues_list_in_order():
    assert list(PLATFORM_TRANSFORMS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_transform_is_deterministic_and_stays_in_range(name):
    x = noisy()
    out = PLATFORM_TRANSFORMS[name](x)
    assert out.dim() == 4 and out.shape[:2] == x.shape[:2] and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, PLATFORM_TRANSFORMS[name](x.clone()))


def test_none_is_the_identity_and_flips_are_involutions():
    x = noisy()
    assert torch.equal(PLATFORM_TRANSFORMS["none"](x), x)
    for name in ("horizontal flip", "vertical flip"):
        flip = PLATFORM_TRANSFORMS[name]
        assert not torch.equal(flip(x), x)
        assert torch.equal(flip(flip(x)), x)
    assert torch.equal(PLATFORM_TRANSFORMS["horizontal flip"](x)[..., 0], x[..., -1])
    assert torch.equal(PLATFORM_TRANSFORMS["vertical flip"](x)[..., 0, :], x[..., -1, :])


@pytest.mark.parametrize("height, width", [(30, 44), (37, 53), (224, 224)])
def test_centre_crop_keeps_90_percent_of_each_side_from_the_centre(height, width):
    x = noisy(height, width, count=1)
    out = PLATFORM_TRANSFORMS["centre crop 90%"](x)
    h, w = round(height * 0.9), round(width * 0.9)
    assert out.shape[-2:] == (h, w)
    top, left = (height - h) // 2, (width - w) // 2
    assert torch.equal(out, x[..., top : top + h, left : left + w])


@pytest.mark.parametrize("name, long_side", [("resize to 1080 px long side", 1080),
                                             ("resize to 2048 px long side", 2048)])
@pytest.mark.parametrize("height, width", [(30, 44), (53, 37), (40, 40)])
def test_long_side_resizes_set_the_long_side_and_keep_the_aspect_ratio(name, long_side, height, width):
    out = PLATFORM_TRANSFORMS[name](noisy(height, width, count=1))
    long_out, short_out = max(out.shape[-2:]), min(out.shape[-2:])
    assert long_out == long_side
    assert (out.shape[-2] > out.shape[-1]) == (height > width)
    assert abs(short_out - min(height, width) * long_side / max(height, width)) <= 1


def test_long_side_resize_also_shrinks_large_images_and_half_halves():
    big = torch.rand(1, 3, 1200, 1500)
    assert resize_long_side(big, 1080).shape[-2:] == (864, 1080)
    assert PLATFORM_TRANSFORMS["resize to half"](noisy(30, 44)).shape[-2:] == (15, 22)
    assert PLATFORM_TRANSFORMS["resize to half"](noisy(37, 53)).shape[-2:] == (18, 26)


@pytest.mark.parametrize("name", ["JPEG 95", "JPEG 90", "JPEG 75", "JPEG 70", "WebP 80", "Gaussian blur σ=2"])
def test_lossy_transforms_change_a_noisy_image(name):
    x = noisy()
    out = PLATFORM_TRANSFORMS[name](x)
    assert out.shape == x.shape
    assert (out - x).abs().mean() > 0.01


def test_lower_jpeg_quality_changes_an_image_more():
    x = noisy()
    error = {q: (PLATFORM_TRANSFORMS[f"JPEG {q}"](x) - x).abs().mean() for q in (95, 90, 75, 70)}
    assert error[95] < error[90] < error[75] < error[70]


def test_the_social_pipeline_serves_a_1080_px_jpeg_75():
    x = noisy(30, 44)
    out = PLATFORM_TRANSFORMS["social pipeline"](x)
    assert out.shape[-2:] == (736, 1080)
    # metadata stripping changes no pixel: the same as resizing and then recompressing
    assert torch.equal(out, jpeg(resize_long_side(x, 1080), 75))
