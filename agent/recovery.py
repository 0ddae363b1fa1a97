"""What a protection record keeps, sealed with the user's data key, so that recovery can do more
than the protected file alone allows: the field the refinement applied (to subtract it from a
copy a platform recompressed or resized, where recomputing it would not give the same field) and
the original values of the few pixels that clipped at black or white (so that recovery from the
file is exact even then).

The field is kept as a platform's JPEG keeps a photo, since that is all a copy still holds of it:
its brightness at full resolution, in steps of a few grey levels (`luma_step`: 3, or about 40% of
the field's bound for the stronger ones), and its colour (the two chroma planes) as means over 4×4
blocks, in steps of `CHROMA_STEP`. That is a third of the bytes
of the field itself, for at most 0.4 dB less on a JPEG-90 4:2:0 copy (bench/quality.py). Exact
recovery never reads the field: it recomputes it from the protected file.

The bytes are versioned. Version 2, written today:
    b"RCV2" | height (u16) | width (u16) | clipped count (u32) | luma step (u8) |
    lzma(luma codes: int8, (height, width)) |
    lzma(chroma codes: int8, (2, ceil(height / 4), ceil(width / 4)), Cb then Cr) |
    lzma(clipped indices: u32 into the (H, W, C) array, ascending, each but the first as the
         difference from the one before; then their values: u16)
with each lzma stream length-prefixed (u32). All integers are little-endian. Luma and chroma are
BT.601 full-range (JPEG's): Y = 0.299 R + 0.587 G + 0.114 B, Cb = (B − Y) / 1.772,
Cr = (R − Y) / 1.402. The field is Y = luma step × code, Cb and Cr = 2 × code upsampled bilinearly (half-
pixel centres, as torch's align_corners=False) to (height, width), then back to RGB. A block at the
bottom or right edge averages the pixels it has.

Version 1 (the first records of the refine scheme) kept the field itself:
    b"RCV1" | height (u16) | width (u16) | clipped count (u32) |
    lzma(field: int8, (3, height, width), whole 8-bit grey levels) |
    lzma(clipped indices: u32, each whole; then their values: u16)
and is read into version 2's form, with the field itself kept too (`exact`).

The field seal
--------------
Recomputing the field is exact only on a machine whose float arithmetic matches the one that
protected: two CPUs with other vector units (AVX2 against AVX-512, or x86 against ARM) run the
surrogate's kernels in another order, and after a few steps the field differs by a few levels at a
few percent of its values. So a lossless protected file carries the field it was protected with,
sealed (`seal_field`): the key holder subtracts it and recovers exactly on any machine, without
the steps; a file that lost it (a tool that drops unknown chunks) falls back on recomputing. The
seal is in a PNG chunk (`images.FIELD_CHUNK`):
    b"RFS1" | height (u16) | width (u16) |
    keys.encrypt_data(HKDF/ChaCha20 keystream of the RGAN key for "rgan-agent field seal v1",
                      lzma(field: int8, (3, height, width), whole 8-bit grey levels),
                      associated data: the 8 bytes before it)
It tells someone without the key only that the file is protected and the field's size.
"""

from __future__ import annotations

import dataclasses
import lzma
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .keys import KeyStoreError, decrypt_data, encrypt_data
from .rgan.keying import keystream

MAGIC, FIRST_MAGIC = b"RCV2", b"RCV1"
LUMA_STEP, CHROMA_STEP, CHROMA_BLOCK = 3, 2, 4
_HEADER = struct.Struct("<4sHHI")
_LUMA_STEP = struct.Struct("<B")
_LENGTH = struct.Struct("<I")
SEAL_MAGIC = b"RFS1"
_SEAL_HEADER = struct.Struct("<4sHH")
_SEAL_INFO = b"rgan-agent field seal v1"
_TO_YCC = np.array([[0.299, 0.587, 0.114],
                    [-0.299 / 1.772, -0.587 / 1.772, 0.886 / 1.772],
                    [0.701 / 1.402, -0.587 / 1.402, -0.114 / 1.402]])
_TO_RGB = np.linalg.inv(_TO_YCC)


def _blocks(height: int, width: int) -> tuple[int, int]:
    return -(-height // CHROMA_BLOCK), -(-width // CHROMA_BLOCK)


def _check_step(step: int) -> None:
    if not isinstance(step, int) or not 1 <= step <= 255:
        raise ValueError(f"the luma step must be an integer in 1..255, got {step!r}")


def _codes(values: np.ndarray, step: int) -> np.ndarray:
    return np.clip(np.rint(values / step), -128, 127).astype(np.int8)


@dataclass(frozen=True)
class RecoveryData:
    """The kept field (`luma`, `chroma` codes; `field()` rebuilds it) and the clipped pixels;
    `exact`: the field itself, where the record holds it (version 1)."""

    luma: np.ndarray
    chroma: np.ndarray
    clipped_at: np.ndarray
    clipped_values: np.ndarray
    luma_step: int = LUMA_STEP
    exact: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.luma, np.ndarray) or self.luma.dtype != np.int8 or self.luma.ndim != 2:
            raise ValueError("the luma codes must be (h, w) int8")
        if (not isinstance(self.chroma, np.ndarray) or self.chroma.dtype != np.int8
                or self.chroma.shape != (2, *_blocks(*self.luma.shape))):
            raise ValueError(f"the chroma codes must be (2, {', '.join(map(str, _blocks(*self.luma.shape)))}) int8")
        if len(self.clipped_at) != len(self.clipped_values):
            raise ValueError("every clipped pixel needs its value")
        _check_step(self.luma_step)

    @staticmethod
    def luma_step_for(epsilon: float) -> int:
        """The luma step for a field bounded by `epsilon` grey levels: its error stays far below a
        copy's own, and a stronger field's record stays as small as a medium one's."""
        return max(LUMA_STEP, round(0.4 * epsilon))

    @classmethod
    def keep(cls, field: np.ndarray, clipped_at: np.ndarray, clipped_values: np.ndarray,
             luma_step: int = LUMA_STEP) -> RecoveryData:
        """What the record keeps of `field` ((3, h, w), 8-bit grey levels) and the clipped pixels."""
        if not isinstance(field, np.ndarray) or field.ndim != 3 or field.shape[0] != 3:
            raise ValueError("the field must be (3, h, w)")
        _check_step(luma_step)
        height, width = field.shape[1:]
        ycc = np.einsum("ij,jhw->ihw", _TO_YCC, field.astype(np.float64))
        rows, cols = _blocks(height, width)
        # edge blocks average what they have: sums over the padded grid over the real counts
        padded = np.zeros((2, rows * CHROMA_BLOCK, cols * CHROMA_BLOCK))
        padded[:, :height, :width] = ycc[1:]
        count = np.zeros((rows * CHROMA_BLOCK, cols * CHROMA_BLOCK))
        count[:height, :width] = 1
        shape = (rows, CHROMA_BLOCK, cols, CHROMA_BLOCK)
        means = padded.reshape(2, *shape).sum((2, 4)) / count.reshape(shape).sum((1, 3))
        return cls(_codes(ycc[0], luma_step), _codes(means, CHROMA_STEP),
                   np.asarray(clipped_at, dtype=np.int64), np.asarray(clipped_values, dtype=np.uint16), luma_step)

    def field(self) -> np.ndarray:
        """The kept field, (3, h, w) float32 in 8-bit grey levels."""
        height, width = self.luma.shape
        chroma = torch.from_numpy(self.chroma.astype(np.float32) * CHROMA_STEP)[None]
        chroma = F.interpolate(chroma, size=(height, width), mode="bilinear", align_corners=False)[0].numpy()
        ycc = np.concatenate([self.luma[None].astype(np.float32) * self.luma_step, chroma])
        return np.einsum("ij,jhw->ihw", _TO_RGB.astype(np.float32), ycc).astype(np.float32)

    def to_bytes(self) -> bytes:
        height, width = self.luma.shape
        order = np.argsort(self.clipped_at, kind="stable")
        at = np.asarray(self.clipped_at, dtype=np.int64)[order]
        # ascending indices as differences: mostly small numbers, which lzma packs far better
        clipped = np.diff(at, prepend=0).astype("<u4").tobytes() + np.asarray(self.clipped_values, dtype="<u2")[order].tobytes()
        parts = [lzma.compress(np.ascontiguousarray(codes).tobytes(), preset=9 | lzma.PRESET_EXTREME)
                 for codes in (self.luma, self.chroma)] + [lzma.compress(clipped)]
        return (_HEADER.pack(MAGIC, height, width, len(self.clipped_at)) + _LUMA_STEP.pack(self.luma_step)
                + b"".join(_LENGTH.pack(len(p)) + p for p in parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> RecoveryData:
        """Reads `to_bytes` (or version 1); anything else is a ValueError (never a field silently
        wrong)."""
        try:
            magic, height, width, count = _HEADER.unpack_from(data)
            if magic not in (MAGIC, FIRST_MAGIC):
                raise ValueError(f"unknown recovery data version {magic!r}")
            offset, parts, luma_step = _HEADER.size, [], LUMA_STEP
            if magic == MAGIC:
                (luma_step,) = _LUMA_STEP.unpack_from(data, offset)
                offset += _LUMA_STEP.size
            for _ in range(3 if magic == MAGIC else 2):
                (length,) = _LENGTH.unpack_from(data, offset)
                parts.append(lzma.decompress(data[offset + _LENGTH.size:offset + _LENGTH.size + length]))
                offset += _LENGTH.size + length
            rows, cols = _blocks(height, width)
            sizes = [height * width, 2 * rows * cols, 6 * count] if magic == MAGIC else [3 * height * width, 6 * count]
            if offset != len(data) or [len(part) for part in parts] != sizes:
                raise ValueError("the recovery data's sizes do not add up")
        except (struct.error, lzma.LZMAError) as error:
            raise ValueError(f"damaged recovery data ({error})") from None
        clipped_at = np.frombuffer(parts[-1][:4 * count], dtype="<u4").astype(np.int64)
        clipped_values = np.frombuffer(parts[-1][4 * count:], dtype="<u2").astype(np.uint16)
        if magic == FIRST_MAGIC:
            field = np.frombuffer(parts[0], dtype=np.int8).reshape(3, height, width)
            return dataclasses.replace(cls.keep(field, clipped_at, clipped_values), exact=field.copy())
        luma = np.frombuffer(parts[0], dtype=np.int8).reshape(height, width).copy()
        chroma = np.frombuffer(parts[1], dtype=np.int8).reshape(2, rows, cols).copy()
        return cls(luma, chroma, np.cumsum(clipped_at), clipped_values, luma_step)


def _seal_key(key: bytes) -> bytes:
    return keystream(key, 32, _SEAL_INFO)


def seal_field(key: bytes, field: np.ndarray) -> bytes:
    """The field a protection applied ((3, h, w) int8 levels), sealed with the RGAN key it used."""
    if not isinstance(field, np.ndarray) or field.dtype != np.int8 or field.ndim != 3 or field.shape[0] != 3:
        raise ValueError("the field must be (3, h, w) int8")
    header = _SEAL_HEADER.pack(SEAL_MAGIC, *field.shape[1:])
    return header + encrypt_data(_seal_key(key), lzma.compress(np.ascontiguousarray(field).tobytes()), header)


def open_field(key: bytes, sealed: bytes) -> np.ndarray:
    """The field `seal_field` sealed; a ValueError for another key, another version or any change."""
    try:
        magic, height, width = _SEAL_HEADER.unpack_from(sealed)
        if magic != SEAL_MAGIC:
            raise ValueError(f"unknown field seal version {magic!r}")
        plain = lzma.decompress(decrypt_data(_seal_key(key), sealed[_SEAL_HEADER.size:], sealed[:_SEAL_HEADER.size]))
    except KeyStoreError:
        raise ValueError("the file's sealed field does not open with this key (another key, or it was changed)") from None
    except (struct.error, lzma.LZMAError) as error:
        raise ValueError(f"damaged field seal ({error})") from None
    if len(plain) != 3 * height * width:
        raise ValueError("the field seal's sizes do not add up")
    return np.frombuffer(plain, dtype=np.int8).reshape(3, height, width).copy()
