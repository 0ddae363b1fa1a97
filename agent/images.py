"""Image files: decoding and inspecting them, their metadata (EXIF, ICC), encoding them (16-bit PNG
included) and resizing pixels. Everything that touches an image file's bytes is here; the
pipeline works on arrays only, and the service decodes an upload once and encodes it once.

Pixels are (H, W, C) uint8 or uint16 arrays with 1 to 4 channels (L, LA, RGB, RGBA), the right
way up. Anything that is not such an image, or cannot be written as asked, is an `ImageError`
whose message names the file.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import atomic_path

try:  # HEIC/HEIF (iPhone photos) through pillow-heif; without it those files get a clear error
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - pillow-heif is a dependency
    HEIF_SUPPORTED = False

# Beyond this a photo is more likely a mistake (or a decompression bomb) than a photo: 100 MP is
# already larger than what any current camera writes.
MAX_PIXELS = 100_000_000
MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
BIT_DEPTHS = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}
# zlib's level for PNG outputs: a photo's PNG at 3 is 4% larger than at Pillow's default 6 and
# written in a quarter of the time (1 s at 6 for 2048×1536, most of a protection's budget)
PNG_LEVEL = 3
# the PNG chunk that carries a protection's sealed field (`recovery.py`): ancillary, private, and
# unsafe to copy, so that an editor that changes the pixels drops it
FIELD_CHUNK = b"rgAN"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow's format name -> the suffixes it is written with (the first is used when the input's
# suffix does not say the format it holds)
FORMAT_SUFFIXES = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",), "HEIF": (".heic", ".heif")}
IMAGE_SUFFIXES = frozenset(s for suffixes in FORMAT_SUFFIXES.values() for s in suffixes)

# EXIF: what goes. GPS (the whole GPS IFD) and what identifies the device or its owner; the
# maker note is a vendor blob that typically holds the body's serial number too. The EXIF
# thumbnail (IFD1) is never written: it would show the unprotected picture.
_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 0x8769, 0x8825, 0xA005
_ORIENTATION = 0x0112
_PIXEL_X, _PIXEL_Y = 0xA002, 0xA003
_DATE_TAGS = (0x0132, 0x9003, 0x9004, 0x9010, 0x9011, 0x9012)  # DateTime, ...Original, ...Digitized, offsets
_REMOVED_TAGS = {
    0xA430: "CameraOwnerName",
    0xA431: "BodySerialNumber",
    0xA435: "LensSerialNumber",
    0xC62F: "CameraSerialNumber",
    0x927C: "MakerNote",
}

# the IJG (libjpeg) base quantization tables in natural order (JPEG standard, Annex K)
_STD_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])
_STD_CHROMA = np.full(64, 99)
_STD_CHROMA[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 24, 25]] = [17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 47, 66]


class ImageError(ValueError):
    """Bytes that are not an image the agent can read (unreadable, unsupported, animated), or
    pixels that cannot be written as asked; the message names the file."""


class TooManyPixelsError(ImageError):
    """An image above the pixel limit: a decompression bomb, or more than a photo needs."""


# ---------------------------------------------------------------- reading

def read_bytes(path: Path) -> bytes:
    """A file's bytes, or an ImageError that says why they cannot be read."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path} is a folder, not an image") from None
    except OSError as error:
        raise ImageError(f"cannot read {path}: {error.strerror or error}") from None


def read_image(path: Path) -> np.ndarray:
    """A photo file's pixels, the right way up."""
    return decode_image(read_bytes(path), str(path))


def decode_image(data: bytes, name: str = "the image") -> np.ndarray:
    """`read_image` for a file's bytes already in memory; `name` is what error messages call it."""
    return decode(bytes(data), name)[0]


def decode(data: bytes, name: str) -> tuple[np.ndarray, bytes | None]:
    """The image's pixels the right way up, and its ICC profile."""
    try:
        with warnings.catch_warnings():
            # MAX_PIXELS is checked below, before any pixel is decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise TooManyPixelsError(f"{name} has {image.width}×{image.height} pixels; at most "
                                             f"{MAX_PIXELS:,} are accepted")
                icc = image.info.get("icc_profile")
                if image.format == "PNG" and _png_bit_depth(data) == 16:
                    return _decode_png16(data), icc
                return _pillow_array(ImageOps.exif_transpose(image), name), icc
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(f"{name} is not an image that can be read ({error})") from None


def _pillow_array(image: Image.Image, path: Path | str) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(image).astype(np.uint16)[:, :, None]
    if mode == "I":
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise ImageError(f"{path} holds 32-bit integer pixels; only 8- and 16-bit images are supported")
        return values.astype(np.uint16)[:, :, None]
    if mode == "F":
        raise ImageError(f"{path} holds floating-point pixels; only 8- and 16-bit images are supported")
    if mode not in MODES.values():
        has_alpha = mode in ("PA", "La", "RGBa") or "transparency" in image.info
        grey = mode in ("1", "La")
        image = image.convert(("LA" if has_alpha else "L") if grey else ("RGBA" if has_alpha else "RGB"))
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def _png_bit_depth(data: bytes) -> int:
    header = data[:26]
    # signature (8), IHDR length (4) and type (4), width (4), height (4), then the bit depth
    return header[24] if len(header) == 26 and header[12:16] == b"IHDR" else 8


def _decode_png16(data: bytes) -> np.ndarray:
    """Pillow reads 16-bit colour PNGs as 8-bit (it has no 16-bit RGB mode), which would silently
    drop the low byte the perturbation lives in; torchvision's libpng decoder keeps all 16 bits.
    Its image I/O is deprecated in favour of torchcodec, but it is pinned here and works."""
    import torch
    from torchvision.io import ImageReadMode, decode_png

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        encoded = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        decoded = decode_png(encoded, ImageReadMode.UNCHANGED, apply_exif_orientation=True)
    return decoded.permute(1, 2, 0).contiguous().numpy().astype(np.uint16)


@dataclass(frozen=True)
class Source:
    """What the output keeps from the original file."""

    format: str
    exif: Image.Exif | None
    icc: bytes | None
    quality: int | None  # JPEG: estimated from its quantization tables
    lossless: bool  # WebP: lossless (VP8L) rather than lossy


def inspect(path: Path | str, data: bytes, max_pixels: int = MAX_PIXELS) -> Source:
    """Format, metadata and quality of an image file (`path` names it in messages); an ImageError
    for anything not a still image in a supported format of at most `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format
                if fmt == "MPO":  # a JPEG with extra pictures (stereo, depth): the first is the photo
                    fmt = "JPEG"
                if fmt not in FORMAT_SUFFIXES or (fmt == "HEIF" and not HEIF_SUPPORTED):
                    raise ImageError(f"{path}: {fmt or 'this'} images are not supported "
                                     "(JPEG, PNG, WebP and HEIC are)")
                if image.width * image.height > max_pixels:
                    raise TooManyPixelsError(f"{path} has {image.width}×{image.height} pixels; at most "
                                             f"{max_pixels:,} are accepted")
                if getattr(image, "n_frames", 1) > 1 and fmt != "JPEG":
                    raise ImageError(f"{path}: animated or multi-image files are not supported")
                quality = estimate_jpeg_quality(image.quantization) \
                    if fmt == "JPEG" and getattr(image, "quantization", None) else None
                exif = image.getexif()
                return Source(fmt, exif if len(exif) else None, image.info.get("icc_profile"), quality,
                               fmt == "WEBP" and webp_lossless(data))
    except ImageError:
        raise
    except UnidentifiedImageError:
        what = "an empty file, not an image" if not data else \
            "not an image the agent can read (JPEG, PNG, WebP and HEIC are)"
        raise ImageError(f"{path}: {what}") from None
    except Image.DecompressionBombError:  # so many pixels that Pillow refuses even to open it
        raise TooManyPixelsError(f"{path} has more pixels than the {max_pixels:,} accepted") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: not an image the agent can read ({error})") from None


def estimate_jpeg_quality(tables: Mapping[int, Sequence[int]]) -> int:
    """The IJG quality (1-100) whose scaled standard tables come nearest the file's (Pillow's
    `image.quantization`, natural order). Exact for files written by libjpeg-based encoders; the
    nearest equivalent for cameras' own tables."""
    luma = np.asarray(tables[0], dtype=np.int64) if 0 in tables else None
    chroma = np.asarray(tables[1], dtype=np.int64) if 1 in tables else None
    best, best_error = 100, None
    for quality in range(100, 0, -1):
        scale = 5000 // quality if quality < 50 else 200 - 2 * quality
        error = 0
        for table, base in ((luma, _STD_LUMA), (chroma, _STD_CHROMA)):
            if table is not None and table.size == 64:
                error += int(np.abs(table - np.clip((base * scale + 50) // 100, 1, 255)).sum())
        if best_error is None or error < best_error:
            best, best_error = quality, error
    return best


def webp_lossless(data: bytes) -> bool:
    """A WebP file holds a lossless (VP8L) bitstream rather than a lossy (VP8) one."""
    offset = 12
    while offset + 8 <= len(data):
        kind, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        if kind in (b"VP8 ", b"VP8L"):
            return kind == b"VP8L"
        offset += 8 + size + (size & 1)
    return False


def clean_exif(exif: Image.Exif | None, size: tuple[int, int]) -> tuple[bytes | None, tuple[str, ...]]:
    """The EXIF block for a protected image, and the names of what was removed: no GPS, no serial
    numbers, owner or maker note, no thumbnail; orientation 1 (the pixels are already turned) and
    the pixel dimensions of the output; everything else (capture date, camera model, exposure) kept.
    """
    if not exif:
        return None, ()
    removed: list[str] = []
    clean = Image.Exif()
    for tag, value in exif.items():
        if tag == _GPS_IFD:
            removed.append("GPS")
        elif tag in _REMOVED_TAGS:
            removed.append(_REMOVED_TAGS[tag])
        elif tag != _EXIF_IFD:
            clean[tag] = value
    sub = {}
    for tag, value in exif.get_ifd(_EXIF_IFD).items():
        if tag in _REMOVED_TAGS:
            removed.append(_REMOVED_TAGS[tag])
        elif tag != _INTEROP_IFD:
            sub[tag] = value
    if sub:
        if _PIXEL_X in sub or _PIXEL_Y in sub:
            sub[_PIXEL_X], sub[_PIXEL_Y] = size
        clean[_EXIF_IFD] = sub
    if _ORIENTATION in clean:
        clean[_ORIENTATION] = 1
    try:
        return clean.tobytes(), tuple(removed)
    except (TypeError, ValueError, KeyError, OverflowError, struct.error):  # a value Pillow cannot write back: keep only the dates rather than fail the photo
        dates = Image.Exif()
        for tag in _DATE_TAGS:
            if tag in exif:
                dates[tag] = exif[tag]
        kept = {tag: sub[tag] for tag in _DATE_TAGS if tag in sub}
        if kept:
            dates[_EXIF_IFD] = kept
        return (dates.tobytes() if len(dates) else None), tuple(removed) + ("other EXIF (unwritable)",)


def colour(pixels: np.ndarray) -> np.ndarray:
    """The colour channels as (H, W, 3): grey repeated, alpha dropped."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return np.repeat(pixels[:, :, :1], 3, axis=2) if pixels.shape[2] <= 2 else pixels[:, :, :3]


def image_psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of the colour channels, on the reference's scale (8 or 16 bits), capped like
    `metrics.PSNR_CAP` so that identical images give a finite figure."""
    from .metrics import PSNR_CAP

    maxval = float(np.iinfo(reference.dtype).max)
    a, b = colour(image).astype(np.float64), colour(reference).astype(np.float64)
    if np.iinfo(image.dtype).max != maxval:
        a *= maxval / np.iinfo(image.dtype).max
    mse = float(np.mean((a - b) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(maxval ** 2 / mse))


def decoded_rgb(data: bytes) -> np.ndarray:
    """What a classifier sees of an encoded image: its colour channels at 8 bits."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def format_of_suffix(path: Path) -> str | None:
    """The format a file's suffix says it holds (None if it says none the agent writes)."""
    return next((fmt for fmt, suffixes in FORMAT_SUFFIXES.items() if Path(path).suffix.lower() in suffixes), None)


# ---------------------------------------------------------------- writing

def write_image(pixels: np.ndarray, dst: Path, quality: int = 95, icc: bytes | None = None) -> None:
    """Writes (H, W[, C]) pixels atomically, in the format of dst's suffix (`quality` for the lossy
    ones), with the colour profile given."""
    dst = Path(dst)
    fmt = format_of_suffix(dst)
    if fmt is None:
        raise ImageError(f"{dst}: unknown output format {dst.suffix!r}; use "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ImageError(f"quality must be an integer in 1..100, got {quality!r}")
    try:
        data = encode_image(pixels, fmt, quality=quality, icc=icc)
    except ImageError as error:
        raise ImageError(f"{dst}: {error}; save as .png") from None
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)


def encode_image(pixels: np.ndarray, fmt: str, *, quality: int = 95, lossless: bool = False,
                 icc: bytes | None = None, exif: bytes | None = None, field_seal: bytes | None = None) -> bytes:
    """(H, W[, C]) uint8/uint16 pixels as a file's bytes in `fmt` (JPEG, PNG, WEBP, HEIF), with the
    colour profile and EXIF block given, and a PNG with the protection's sealed field
    (`recovery.seal_field`) in its `FIELD_CHUNK`. 16-bit pixels only as PNG."""
    if field_seal is not None and fmt != "PNG":
        raise ImageError(f"only a PNG carries the sealed field, not {fmt}")
    encoded = _encode(pixels, fmt, quality, lossless, icc, exif)
    return encoded if field_seal is None else _png_with_chunk(encoded, FIELD_CHUNK, field_seal)


def png_chunk(data: bytes, kind: bytes) -> bytes | None:
    """The body of a PNG's first chunk of type `kind` before its image data, or None."""
    offset = len(_PNG_SIGNATURE) if data.startswith(_PNG_SIGNATURE) else len(data)
    while offset + 8 <= len(data):
        length, found = struct.unpack_from(">I4s", data, offset)
        if found in (kind, b"IDAT"):
            return data[offset + 8:offset + 8 + length] if found == kind else None
        offset += 12 + length
    return None


def _encode(pixels: np.ndarray, fmt: str, quality: int, lossless: bool, icc: bytes | None,
            exif: bytes | None) -> bytes:
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    icc = _matching_icc(icc, channels)
    if pixels.dtype == np.uint16:
        if fmt != "PNG":
            raise ImageError(f"{fmt} cannot hold 16-bit pixels")
        return _png_with_exif(_encode_png16(pixels, icc), exif)
    if fmt == "JPEG" and channels in (2, 4):
        raise ImageError("JPEG cannot hold an alpha channel")
    params: dict[str, Any] = {}
    if icc:
        params["icc_profile"] = icc
    if exif:
        params["exif"] = exif
    if fmt == "JPEG":
        # 4:4:4: chroma subsampling would average away half of the colour perturbation
        params.update(quality=int(quality), subsampling=0)
    elif fmt == "WEBP":
        params.update(lossless=True, quality=100) if lossless else params.update(quality=int(quality))
    elif fmt == "HEIF":
        params.update(quality=int(quality), chroma="444")
    elif fmt == "PNG":
        params.update(compress_level=PNG_LEVEL)
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _matching_icc(icc: bytes | None, channels: int) -> bytes | None:
    """The source's colour profile if it still describes the output: grayscale photos come out
    in colour and CMYK ones as RGB, and a profile of another colour space would be misapplied."""
    space = b"GRAY" if channels <= 2 else b"RGB "
    return icc if icc and icc[16:20] == space else None


def _png_with_exif(png: bytes, exif: bytes | None) -> bytes:
    if not exif:
        return png
    return _png_with_chunk(png, b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)


def _png_with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """Inserts a chunk after IHDR (before the image data, as the PNG spec asks of eXIf)."""
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr_end = len(_PNG_SIGNATURE) + 8 + 13 + 4  # signature, IHDR length+type, IHDR data, CRC
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def _encode_png16(pixels: np.ndarray, icc: bytes | None) -> bytes:
    """A 16-bit PNG of any of the four layouts (Pillow writes 16 bits only for grayscale).
    Every row uses the Up filter: vectorised, and it compresses photos far better than none."""
    height, width, channels = pixels.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = pixels.astype(">u2").reshape(height, -1).view(np.uint8)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 wraps modulo 256, as PNG wants

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    parts = [_PNG_SIGNATURE, chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))]
    if icc:
        parts.append(chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    parts += [chunk(b"IDAT", zlib.compress(filtered.tobytes(), PNG_LEVEL)), chunk(b"IEND", b"")]
    return b"".join(parts)


# ---------------------------------------------------------------- resizing

def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos, channel by channel in float so that 16-bit depth survives and alpha is resized
    exactly like the colours (no premultiplication that would lose the colour of transparent
    pixels)."""
    maxval = np.iinfo(pixels.dtype).max
    planes = [np.asarray(Image.fromarray(pixels[:, :, c].astype(np.float32))
                         .resize((width, height), Image.Resampling.LANCZOS)) for c in range(pixels.shape[2])]
    return np.clip(np.rint(np.stack(planes, axis=2)), 0, maxval).astype(pixels.dtype)
