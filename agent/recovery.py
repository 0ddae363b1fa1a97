"""What a protection record keeps, sealed with the user's data key, so that recovery can do more
than the protected file alone allows: the field the refinement applied (to subtract it from a
copy a platform recompressed or resized, where recomputing it would not give the same field) and
the original values of the few pixels that clipped at black or white (so that recovery from the
file is exact even there).

The bytes are versioned: version 1 is
    b"RCV1" | height (u16) | width (u16) | clipped count (u32) |
    lzma(field: int8, (3, height, width), whole 8-bit grey levels) |
    lzma(clipped indices: u32 little-endian into the (H, W, C) array, then their values: u16 little-endian)
with the two lzma streams length-prefixed (u32 each). All integers are little-endian.
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"RCV1"
_HEADER = struct.Struct("<4sHHI")
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class RecoveryData:
    field: np.ndarray
    clipped_at: np.ndarray
    clipped_values: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.field, np.ndarray) or self.field.dtype != np.int8 or self.field.ndim != 3 \
                or self.field.shape[0] != 3:
            raise ValueError("the field must be (3, h, w) int8")
        if len(self.clipped_at) != len(self.clipped_values):
            raise ValueError("every clipped pixel needs its value")

    def to_bytes(self) -> bytes:
        _, height, width = self.field.shape
        clipped = np.asarray(self.clipped_at, dtype="<u4").tobytes() + np.asarray(self.clipped_values, dtype="<u2").tobytes()
        parts = [lzma.compress(np.ascontiguousarray(self.field).tobytes()), lzma.compress(clipped)]
        return _HEADER.pack(MAGIC, height, width, len(self.clipped_at)) + b"".join(_LENGTH.pack(len(p)) + p for p in parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> RecoveryData:
        """Reads `to_bytes`; anything else is a ValueError (never a field silently wrong)."""
        try:
            magic, height, width, count = _HEADER.unpack_from(data)
            if magic != MAGIC:
                raise ValueError(f"unknown recovery data version {magic!r}")
            offset, parts = _HEADER.size, []
            for _ in range(2):
                (length,) = _LENGTH.unpack_from(data, offset)
                parts.append(lzma.decompress(data[offset + _LENGTH.size:offset + _LENGTH.size + length]))
                offset += _LENGTH.size + length
            if offset != len(data) or len(parts[0]) != 3 * height * width or len(parts[1]) != 6 * count:
                raise ValueError("the recovery data's sizes do not add up")
        except (struct.error, lzma.LZMAError) as error:
            raise ValueError(f"damaged recovery data ({error})") from None
        field = np.frombuffer(parts[0], dtype=np.int8).reshape(3, height, width).copy()
        clipped_at = np.frombuffer(parts[1][:4 * count], dtype="<u4").astype(np.int64)
        clipped_values = np.frombuffer(parts[1][4 * count:], dtype="<u2").astype(np.uint16)
        return cls(field, clipped_at, clipped_values)
