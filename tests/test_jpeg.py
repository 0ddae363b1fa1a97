"""agent/jpeg.py: the block model matches what libjpeg stores, and the estimate within its bounds
beats subtracting the perturbation from a JPEG's pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import SAMPLE
from PIL import Image

from agent import jpeg
from agent.jpeg import Quantization, most_likely_original


def sample(width: int = 200, height: int = 152) -> np.ndarray:
    with Image.open(SAMPLE) as image:
        return np.asarray(image.convert("RGB").crop((40, 30, 40 + width, 30 + height)))


def encode(pixels: np.ndarray, quality: int, subsampling: int = 0, **extra) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, subsampling=subsampling, **extra)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def key_noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A stand-in for a protection's perturbation: ±4 grey levels, independent per pixel."""
    return 4 * np.random.default_rng(seed).choice([-1, 1], size=shape)


def test_snapping_to_the_files_grid_gives_back_the_decoded_pixels():
    """DCT, colour transform, level shift and table order as libjpeg has them: a decoded
    quality-50 file's coefficients, rounded to multiples of its steps, decode to its pixels up to
    the decoder's own rounding. Tables read in the wrong order (transposed) do not."""
    data = encode(sample(), 50)
    tables = Quantization.read(data)
    assert tables is not None and tables.luma[0, 0] == 16 and tables.chroma[0, 0] == 17  # IJG tables at 50
    decoded = decode(data)
    coefficients = jpeg._dct((decoded - 128.0) @ jpeg._RGB_TO_YCC.T)

    def redecoded_rms(steps: np.ndarray) -> float:
        pixels = jpeg._idct(steps * np.rint(coefficients / steps)) @ jpeg._YCC_TO_RGB.T + 128
        return float(np.sqrt(np.mean((pixels - decoded) ** 2)))

    assert redecoded_rms(tables.steps()) < 0.8
    assert redecoded_rms(tables.steps().transpose(0, 2, 1)) > 1.2


def test_the_block_transform_inverts():
    pixels = np.random.default_rng(1).uniform(-128, 128, (16, 24, 3))
    assert np.allclose(jpeg._idct(jpeg._dct(pixels)), pixels)


@pytest.mark.parametrize(("low", "high", "scale"), [(1.0, 3.0, 0.5), (-4.0, -1.5, 2.0), (-0.7, 2.3, 1.1),
                                                    (-6.0, 6.0, 0.3), (0.2, 9.0, 40.0)])
def test_the_laplace_mean_matches_numerical_integration(low, high, scale):
    grid = np.linspace(low, high, 400_001)
    weights = np.exp(-np.abs(grid) / scale)
    expected = float((grid * weights).sum() / weights.sum())
    got = jpeg._laplace_mean(np.array([low]), np.array([high]), np.array([scale]))[0]
    assert got == pytest.approx(expected, abs=1e-4)


def test_the_laplace_mean_stays_finite_far_out_in_the_tail():
    got = jpeg._laplace_mean(np.array([900.0, -910.0, -5.0]), np.array([910.0, -900.0, 5.0]), np.array([0.01] * 3))
    assert np.allclose(got, [900.01, -900.01, 0.0])


def test_the_estimate_beats_subtracting_from_the_decoded_file():
    original = sample()
    perturbation = key_noise(original.shape)
    protected = np.clip(original + perturbation, 0, 255).astype(np.uint8)
    for quality in (90, 95):
        data = encode(protected, quality)
        decoded = decode(data)
        plain = np.clip(decoded - perturbation, 0, 255)
        estimate = most_likely_original(decoded, perturbation, Quantization.read(data))
        assert estimate.dtype == np.uint8 and estimate.shape == original.shape
        assert psnr(estimate, original) > psnr(plain, original) + 3


def test_partial_edge_blocks_keep_the_plain_estimate():
    original = sample(37, 29)  # a 5-pixel strip at the bottom and at the right
    perturbation = key_noise(original.shape, seed=2)
    data = encode(np.clip(original + perturbation, 0, 255).astype(np.uint8), 92)
    decoded = decode(data)
    estimate = most_likely_original(decoded, perturbation, Quantization.read(data))
    plain = np.clip(decoded - perturbation, 0, 255)
    assert np.array_equal(estimate[24:], plain[24:]) and np.array_equal(estimate[:, 32:], plain[:, 32:])
    assert not np.array_equal(estimate[:24, :32], plain[:24, :32])


def test_a_zero_perturbation_still_dequantises_a_plain_jpeg_no_worse():
    original = sample()
    data = encode(original, 85)
    decoded = decode(data)
    estimate = most_likely_original(decoded, np.zeros(original.shape), Quantization.read(data))
    assert psnr(estimate, original) >= psnr(decoded, original) - 0.05


def test_files_the_block_model_does_not_fit_give_no_tables():
    pixels = sample(64, 48)
    assert Quantization.read(encode(pixels, 92)) is not None
    assert Quantization.read(encode(pixels, 92, subsampling=2)) is None  # 4:2:0
    assert Quantization.read(encode(pixels[..., 0], 92)) is None  # grayscale
    rotated = Image.Exif()
    rotated[0x0112] = 6
    assert Quantization.read(encode(pixels, 92, exif=rotated.tobytes())) is None
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    assert Quantization.read(png.getvalue()) is None
    assert Quantization.read(b"") is None and Quantization.read(b"\xff\xd8 truncated") is None


def test_mismatched_inputs_are_refused():
    pixels = sample(16, 16)
    tables = Quantization.read(encode(pixels, 90))
    with pytest.raises(ValueError, match="does not fit"):
        most_likely_original(pixels, np.zeros((8, 8, 3)), tables)
    with pytest.raises(ValueError, match="uint8"):
        most_likely_original(pixels.astype(np.uint16), np.zeros(pixels.shape), tables)
