"""The perceptual hash that finds a platform's copy of a protected image (records/README.md,
"Perceptual hash")."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ProvenanceError

if TYPE_CHECKING:
    from PIL import Image

PHASH_MAX_DISTANCE = 8


def perceptual_hash(image: bytes | Path | str | np.ndarray | Image.Image) -> str:
    """The 64-bit perceptual hash (16 hex digits) of an image: an encoded file's bytes or path, a
    PIL image, or an (H, W[, C]) uint8/uint16 array. EXIF orientation is applied first, as a
    platform displays the image."""
    import imagehash
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, (bytes, bytearray, memoryview, str, Path)):
        try:
            with Image.open(io.BytesIO(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview))
                            else image) as opened:
                picture = ImageOps.exif_transpose(opened)
                picture.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise ProvenanceError(f"cannot read the image to hash it: {error}") from None
    elif isinstance(image, np.ndarray):
        picture = Image.fromarray(_to_uint8(image))
    else:
        picture = image
    if picture.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        picture = Image.fromarray(_to_uint8(np.asarray(picture)))
    return str(imagehash.phash(picture))


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind in "iu":
        return (np.clip(pixels, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # floats in [0, 1]


def hamming(a: Any, b: Any) -> int | None:
    """SQL function hamming(a, b): bits differing between two 16-hex-digit hashes; NULL if either
    is not one."""
    try:
        return (int(a, 16) ^ int(b, 16)).bit_count()
    except (TypeError, ValueError):
        return None
