"""Exact keyed recovery by additive coupling: every pixel is changed, and the key holder can
undo every change from the protected pixels alone.

The key splits the pixels into two interleaved parts. In every 2×2 cell one diagonal belongs to
the *field* part and the other to the *pattern* part; a key bit per cell says which diagonal is
which, so every pixel has at least two 4-neighbours in the other part.

Protection changes the parts one after the other, and each change depends only on what recovery
will know when it undoes it:
1. the field part gets the adversarial field, computed from the pattern part's *original* pixels
   (recovery knows them by then: it undoes the pattern part first);
2. the pattern part gets the key's ±1 pattern, a few grey levels, scaled by the headroom its
   neighbours in the field part show *as protected* (recovery reads them from the file).
Recovery undoes 2 with the file and the key, then recomputes 1 from the restored pattern part and
subtracts it.

Clipping at black and white would lose what it cut off, so each change is first bounded by the
headroom of the pixel's known neighbours (less `MARGIN`): a pixel can only clip if it is brighter
(or darker) than all its known neighbours by more than the margin and sits by the limit, a lone
speck. Protection lists those (`Coupled.clipped_at`) and the provenance record keeps their original
values, so recovery with the record is exact even then.

Every step here is integer or exactly rounded elementwise arithmetic in numpy, so it gives the
same result on every machine; only the adversarial field itself comes from float code
(`refine.py`, which pins its thread count for that reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .rgan.keying import key_pattern, keystream

_SPLIT_INFO = b"rgan-agent coupling split v1"
# headroom kept from the known neighbours' extremes, in 8-bit grey levels
MARGIN = 12


def field_part(key: bytes, height: int, width: int) -> np.ndarray:
    """(H, W) bool, True on the field part: one diagonal of every 2×2 cell, chosen by the key."""
    rows, cols = -(-height // 2), -(-width // 2)
    bits = np.unpackbits(np.frombuffer(keystream(key, (rows * cols + 7) // 8, _SPLIT_INFO), dtype=np.uint8))
    flip = bits[: rows * cols].reshape(rows, cols).astype(bool)
    flip = np.repeat(np.repeat(flip, 2, axis=0), 2, axis=1)[:height, :width]
    y, x = np.ogrid[:height, :width]
    return ((y % 2) == (x % 2)) ^ flip


def _planes(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, C) pixels → (C, H, W) int16 (8-bit images) or int32 (16-bit): integer arithmetic is
    exact, so every result here is the same whatever the thread count or machine, and 8-bit
    images move a quarter of the bytes float32 would."""
    dtype = np.int16 if pixels.dtype == np.uint8 else np.int32
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(dtype))


def _window_extreme(planes: torch.Tensor, pick) -> torch.Tensor:
    """`pick` (torch.maximum or torch.minimum) over each pixel's 3×3 window, by rows then columns."""
    out = planes.clone()
    out[..., :, :-1] = pick(out[..., :, :-1], planes[..., :, 1:])
    out[..., :, 1:] = pick(out[..., :, 1:], planes[..., :, :-1])
    rows = out.clone()
    out[..., :-1, :] = pick(out[..., :-1, :], rows[..., 1:, :])
    out[..., 1:, :] = pick(out[..., 1:, :], rows[..., :-1, :])
    return out


def estimate(known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image (C, H, W) with its unknown pixels (`mask` False; their values in `known` are
    ignored) filled by the mean of their known 4-neighbours, or by all known pixels' mean where none
    is known (only a single-pixel corner cell), as float32. Integer sums, then one correctly
    rounded division: exact."""
    values = (known * mask).int()
    weight = mask.int()
    total, count = torch.zeros_like(values), torch.zeros_like(weight)
    total[..., 1:, :] += values[..., :-1, :]
    total[..., :-1, :] += values[..., 1:, :]
    total[..., :, 1:] += values[..., :, :-1]
    total[..., :, :-1] += values[..., :, 1:]
    count[1:, :] += weight[:-1, :]
    count[:-1, :] += weight[1:, :]
    count[:, 1:] += weight[:, :-1]
    count[:, :-1] += weight[:, 1:]
    lonely = ~mask & (count == 0)
    if bool(lonely.any()):
        total[:, lonely] = torch.div(values.sum((1, 2)), weight.sum().clamp(min=1), rounding_mode="floor")[:, None].int()
        count[lonely] = 1
    return torch.where(mask, values.float(), total.float() / count.clamp(min=1).float())


def headroom(planes: torch.Tensor, known: torch.Tensor, maxval: int, margin: int,
             spread: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(lowest, highest) change, in integer units, that each unknown pixel may take without
    clipping, judged by its known 8-neighbours: down to `margin` 8-bit levels above the darkest of
    them, up to as much below the brightest (with `spread`, less their spread as well, as the
    first refine method had it); 0 where none is known (only a single-pixel corner cell) or no
    room is left. A pixel's own value never counts."""
    high = _window_extreme(torch.where(known, planes, -1), torch.maximum)
    low = _window_extreme(torch.where(known, planes, maxval + 1), torch.minimum)
    margin *= maxval // 255
    if spread:
        # how far a pixel may stray from its neighbours grows with how far they stray from each
        # other; but textured regions, where the field does most, are then left nearly no room
        margin = margin + high - low
    up = (maxval - margin - high).clamp(min=0)
    down = (low - margin).clamp(min=0)
    unseen = high < 0
    if bool(unseen.any()):
        up[unseen], down[unseen] = 0, 0
    return -down, up


def bounded(change: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A change rounded to integers within the headroom, in the headroom's integer type."""
    return torch.minimum(torch.maximum(change.round().to(low.dtype), low), high)


@dataclass(frozen=True)
class Coupled:
    """A protected image and the pixels that clipped anyway: their flat indices into the
    (H, W, C) array and original values, which the record keeps for an exact recovery."""

    pixels: np.ndarray
    clipped_at: np.ndarray
    clipped_values: np.ndarray


# the field part's change (C, H, W), float, integer units, given the pattern part's original pixels
# (C, H, W, the field part zeroed), the pattern part's mask (H, W) and the field part's headroom
FieldFn = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Coupling:
    """The key, the field, the key pattern's amplitude (integer units) and the field's reach (the
    most it changes a pixel, in 8-bit levels: the pattern part's headroom is judged on protected
    neighbours, which the field moved by up to that much), and the headroom's rule."""

    key: bytes
    field: FieldFn
    amplitude: int
    reach: int
    # the headroom's rule (`headroom`), as the refine method that protected had it
    spread: bool = False

    def field_change(self, planes: torch.Tensor, part: torch.Tensor, maxval: int) -> torch.Tensor:
        """The field part's change, from nothing but the pattern part's pixels in `planes`.

        Those are read clamped to `amplitude` inside the limits: a pattern pixel that clipped comes
        back from the file alone off by at most the amplitude, and only next to a limit, so the
        clamp reads it the same either way and the field is recomputed unchanged."""
        known = planes.clamp(self.amplitude, maxval - self.amplitude) * ~part
        room = headroom(known, ~part, maxval, MARGIN, self.spread)
        return bounded(self.field(known, ~part, room), *room) * part

    def pattern_change(self, protected: torch.Tensor, part: torch.Tensor, maxval: int) -> torch.Tensor:
        """The pattern part's change: the key's ±1 pattern times the amplitude, within the headroom
        of the field part's protected pixels (what the file holds)."""
        channels, height, width = protected.shape
        signs = key_pattern(self.key, height, width)[:channels].to(protected.dtype)
        room = headroom(protected, part, maxval, MARGIN + self.reach, self.spread)
        return bounded(signs * self.amplitude, *room) * ~part

    def couple(self, pixels: np.ndarray) -> Coupled:
        """Protects (H, W, C) integer pixels: the field part first, then the pattern part."""
        maxval = int(np.iinfo(pixels.dtype).max)
        part = torch.from_numpy(field_part(self.key, *pixels.shape[:2]))
        planes = _planes(pixels)
        out = planes + self.field_change(planes, part, maxval)
        out += self.pattern_change(out.clamp(0, maxval), part, maxval)
        result = np.ascontiguousarray(out.clamp(0, maxval).permute(1, 2, 0).numpy(), dtype=pixels.dtype)
        clipped = np.flatnonzero(((out < 0) | (out > maxval)).permute(1, 2, 0).numpy())
        return Coupled(result, clipped, pixels.reshape(-1)[clipped])

    def change(self, protected: np.ndarray) -> np.ndarray:
        """The change `couple` made, (H, W, C) integers, as well as a copy of the protected image
        tells it (the headroom is read off the copy, which matters only beside black and white):
        what to subtract from a copy that was recompressed, given the field it was made with."""
        maxval = int(np.iinfo(protected.dtype).max)
        part = torch.from_numpy(field_part(self.key, *protected.shape[:2]))
        planes = _planes(protected)
        pattern = self.pattern_change(planes, part, maxval)
        change = pattern + self.field_change(planes - pattern, part, maxval)
        return np.ascontiguousarray(change.permute(1, 2, 0).numpy())

    def uncouple(self, protected: np.ndarray, clipped_at: np.ndarray | None = None,
                 clipped_values: np.ndarray | None = None) -> np.ndarray:
        """Undoes `couple`: the pattern part with the file and the key, then the field recomputed
        from the restored pattern part. With the record's clipped pixels the result is exact; from
        the file alone a pixel that clipped is off by what it lost (a lone speck by black or white)."""
        maxval = int(np.iinfo(protected.dtype).max)
        part = torch.from_numpy(field_part(self.key, *protected.shape[:2]))
        planes = _planes(protected)
        planes -= self.pattern_change(planes, part, maxval)
        planes -= self.field_change(planes, part, maxval)
        out = np.ascontiguousarray(planes.clamp(0, maxval).permute(1, 2, 0).numpy(), dtype=protected.dtype)
        if clipped_at is not None and len(clipped_at):
            out.reshape(-1)[clipped_at] = clipped_values
        return out
