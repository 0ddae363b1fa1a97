"""What a JPEG file keeps of a protected photo, and the original most likely under it.

A JPEG stores each 8×8 block's DCT coefficients of Y, Cb and Cr rounded to multiples of its
quantisation table, so every coefficient of a decoded image is off by up to half a step. For a
protected photo that loss is large: the key pattern is white noise, whose energy sits in the high
frequencies where the steps are coarsest, so a quality-95 copy is only about 37 dB from the
protected PNG, and recovery that merely subtracts the perturbation can do no better.

The owner can. With the key, the perturbation is known (the pattern exactly, G's share from the
recovered estimate), so each stored coefficient bounds the original's coefficient to an interval
one step wide. Natural photos have small high-frequency coefficients, so the estimate is the mean
of a Laplacian prior (its scale fitted per frequency and channel) restricted to that interval:
the quantisation-constraint-set view of JPEG decoding, with the perturbation taken out first.
On held-back photos this lifts recovery from the agent's own quality-95 outputs from about 37 to
38–44 dB (`bench/jpeg_outputs.py`).

Only files this model fits are used (`Quantization.of` says None otherwise): YCbCr with chroma at
full resolution (4:4:4, what the agent writes), upright (no EXIF rotation). Partial blocks at the
right and bottom edges keep the plain estimate: the file's padding of them is not decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin

BLOCK = 8
BAND_PIXELS = 1 << 21  # statistics and temporaries per band of rows, so memory stays bounded
SCALE_FLOOR = 1e-2  # the prior's smallest scale: a frequency the noise fills entirely

# JFIF's full-range BT.601 transform; its chroma rows sum to zero, so it maps level-shifted RGB
# (minus 128) to level-shifted YCbCr, which is what the DCT sees.
_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114],
                        [-0.168736, -0.331264, 0.5],
                        [0.5, -0.418688, -0.081312]])
_YCC_TO_RGB = np.linalg.inv(_RGB_TO_YCC)
_LEVEL = 128.0


def _dct_matrix() -> np.ndarray:
    """The orthonormal 8-point DCT-II, which is JPEG's transform (ITU T.81 A.3.3)."""
    n = np.arange(BLOCK)
    matrix = np.sqrt(2 / BLOCK) * np.cos((2 * n[None, :] + 1) * n[:, None] * np.pi / (2 * BLOCK))
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix()


@dataclass(frozen=True)
class Quantization:
    """The file's quantisation steps in natural (row-major) order, (8, 8) each."""

    luma: np.ndarray
    chroma: np.ndarray

    @classmethod
    def of(cls, image: Image.Image) -> Quantization | None:
        """The tables of an open Pillow JPEG, or None where the block model does not fit."""
        tables = getattr(image, "quantization", None) or {}
        if image.format not in ("JPEG", "MPO") or image.mode != "RGB" or not {0, 1} <= set(tables):
            return None
        if JpegImagePlugin.get_sampling(image) != 0:  # subsampled chroma: blocks cover 16×16 pixels
            return None
        if "adobe" in image.info and image.info.get("adobe_transform") == 0:  # RGB stored as is
            return None
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # pixels rotated off the block grid
            return None
        return cls(*(np.asarray(tables[t], dtype=np.float64).reshape(BLOCK, BLOCK) for t in (0, 1)))

    @classmethod
    def read(cls, data: bytes) -> Quantization | None:
        """The tables of a file's bytes; None for anything but a JPEG the model fits."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                return cls.of(image)
        except (OSError, SyntaxError, ValueError):
            return None

    def steps(self) -> np.ndarray:
        """(3, 8, 8): Y uses table 0, Cb and Cr table 1 (libjpeg's assignment)."""
        return np.stack([self.luma, self.chroma, self.chroma])


def most_likely_original(decoded: np.ndarray, perturbation: np.ndarray, tables: Quantization) -> np.ndarray:
    """The original whose protected image (`original + perturbation`) is most likely to have
    been stored as this JPEG. `decoded` is the file's pixels, (H, W, 3) uint8; `perturbation`
    what protection added, in grey levels, same shape. Returns (H, W, 3) uint8."""
    if decoded.dtype != np.uint8 or decoded.ndim != 3 or decoded.shape[2] != 3:
        raise ValueError(f"a decoded JPEG is (H, W, 3) uint8, got {decoded.shape} {decoded.dtype}")
    if perturbation.shape != decoded.shape:
        raise ValueError(f"perturbation {perturbation.shape} does not fit the image {decoded.shape}")
    estimate = decoded.astype(np.float64) - perturbation
    height, width = (decoded.shape[0] // BLOCK) * BLOCK, (decoded.shape[1] // BLOCK) * BLOCK
    if height and width:
        rows = max(BLOCK, BAND_PIXELS // width // BLOCK * BLOCK)
        for top in range(0, height, rows):
            band = slice(top, min(height, top + rows)), slice(0, width)
            estimate[band] = _estimate_band(decoded[band], perturbation[band].astype(np.float64), tables.steps())
    return np.clip(np.rint(estimate), 0, 255).astype(np.uint8)


def _estimate_band(decoded: np.ndarray, perturbation: np.ndarray, steps: np.ndarray) -> np.ndarray:
    stored = _dct((decoded - _LEVEL) @ _RGB_TO_YCC.T)
    # the decoder's rounding moves a coefficient by well under half a step, so snapping to the
    # nearest multiple gives back what the file holds
    stored = steps * np.rint(stored / steps)
    centre = stored - _dct(perturbation @ _RGB_TO_YCC.T)
    noise = steps**2 / 12  # the variance a uniform rounding error adds to each coefficient
    variance = np.mean(centre**2, axis=(0, 1)) - noise
    scale = np.sqrt(np.maximum(variance, SCALE_FLOOR**2 * 2) / 2)
    coefficients = _laplace_mean(centre - steps / 2, centre + steps / 2, scale)
    coefficients[..., 0, 0] = centre[..., 0, 0]  # a block's mean has no prior worth the name
    return _idct(coefficients) @ _YCC_TO_RGB.T + _LEVEL


def _dct(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) → (H/8, W/8, 3, 8, 8) block coefficients."""
    height, width, channels = pixels.shape
    blocks = pixels.reshape(height // BLOCK, BLOCK, width // BLOCK, BLOCK, channels).transpose(0, 2, 4, 1, 3)
    return _DCT @ blocks @ _DCT.T


def _idct(coefficients: np.ndarray) -> np.ndarray:
    rows, cols, channels = coefficients.shape[:3]
    blocks = _DCT.T @ coefficients @ _DCT
    return blocks.transpose(0, 3, 1, 4, 2).reshape(rows * BLOCK, cols * BLOCK, channels)


def _laplace_mean(low: np.ndarray, high: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The mean of a Laplace(0, scale) variable restricted to [low, high] (high > low), elementwise.

    On one side of zero it is a truncated exponential; across zero, the two halves' moments are
    combined. Only the truncated exponential's expm1 can overflow, and inf is its right limit."""
    scale = np.broadcast_to(scale, low.shape)
    width = high - low
    # the mean of an exponential truncated to [0, width], measured from its near end (a very
    # narrow prior overflows expm1 to inf, which rightly leaves just the scale)
    with np.errstate(over="ignore"):
        near_offset = scale - width / np.expm1(width / scale)
    above = low + near_offset
    below = high - near_offset
    plus, minus = np.maximum(high, 0), np.maximum(-low, 0)
    mass_plus, mass_minus = -np.expm1(-plus / scale), -np.expm1(-minus / scale)
    moment_plus = scale - (plus + scale) * np.exp(-plus / scale)
    moment_minus = scale - (minus + scale) * np.exp(-minus / scale)
    across = (moment_plus - moment_minus) / (mass_plus + mass_minus)
    return np.where(low >= 0, above, np.where(high <= 0, below, across))
