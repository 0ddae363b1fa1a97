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

Every step here is integer or exactly rounded elementwise arithmetic, so it gives the same result
on every machine; only the adversarial field itself comes from float code (`refine.py`, which
pins its thread count for that reason).

Everything but the field is local (a pixel and its 3×3 neighbours), so the image is coupled in
bands of `BAND` rows: a 24-megapixel photo never has more than a band in any wide integer type.
The field is computed once from the whole image (`Known`) and read back a band of rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .rgan.keying import key_pattern, keystream

_SPLIT_INFO = b"rgan-agent coupling split v1"
# headroom kept from the known neighbours' extremes, in 8-bit grey levels
MARGIN = 12
# rows per band: a band's working arrays take about 40 bytes a pixel
BAND = 256


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


class Known:
    """What the field may depend on: the pattern part's pixels (original ones at protection,
    restored ones at recovery), read clamped to `amplitude` inside the limits. A pattern pixel that
    clipped comes back from the file alone off by at most the amplitude, and only next to a limit,
    so the clamp reads it the same either way and the field is recomputed unchanged."""

    def __init__(self, pixels: np.ndarray, part: np.ndarray, amplitude: int, spread: bool):
        self.pixels, self.part, self.amplitude, self.spread = pixels, part, amplitude, spread
        self.maxval = int(np.iinfo(pixels.dtype).max)

    @property
    def shape(self) -> tuple[int, int]:
        return self.part.shape

    def band(self, top: int, bottom: int) -> torch.Tensor:
        """Rows [top, bottom) as (C, rows, W) integers, the field part zeroed."""
        planes = _planes(self.pixels[top:bottom]).clamp(self.amplitude, self.maxval - self.amplitude)
        return planes * torch.from_numpy(~self.part[top:bottom])

    def whole(self) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The whole image's known pixels (`band`), the mask of the known ones and the field
        part's headroom: for photos small enough to be rendered at full size."""
        known, mask = self.band(0, self.shape[0]), torch.from_numpy(~self.part)
        return known, mask, headroom(known, mask, self.maxval, MARGIN, self.spread)

    def planes(self) -> Iterator[np.ndarray]:
        """Each channel's known pixels on [0, 1] as (H, W) float32, unknown ones 0, one at a time."""
        for channel in range(self.pixels.shape[2]):
            plane = self.pixels[..., channel].clip(self.amplitude, self.maxval - self.amplitude).astype(np.float32)
            plane[self.part] = 0
            plane /= self.maxval
            yield plane


# the full-size field, (C, rows, W) float in integer units, given the first and last row + 1
FieldRows = Callable[[int, int], torch.Tensor]
# the field part's change, from what may be known when it is undone
FieldFn = Callable[[Known], FieldRows]


def bands(height: int) -> Iterator[tuple[int, int]]:
    for top in range(0, height, BAND):
        yield top, min(top + BAND, height)


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

    def _field_change(self, known: Known, rows: FieldRows, top: int, bottom: int) -> torch.Tensor:
        """The field part's change on rows [top, bottom), within its headroom (judged on the known
        pixels one row further out)."""
        above, below = max(top - 1, 0), min(bottom + 1, known.shape[0])
        room = headroom(known.band(above, below), torch.from_numpy(~known.part[above:below]), known.maxval,
                        MARGIN, self.spread)
        inner = slice(top - above, bottom - above)
        change = bounded(rows(top, bottom), room[0][:, inner], room[1][:, inner])
        return change * torch.from_numpy(known.part[top:bottom])

    def _pattern_change(self, protected: torch.Tensor, part: np.ndarray, pattern: torch.Tensor, maxval: int,
                        top: int, bottom: int, above: int) -> torch.Tensor:
        """The pattern part's change on rows [top, bottom): the key's ±1 pattern times the
        amplitude, within the headroom of the field part's protected pixels (what the file holds),
        given as `protected` from row `above` to one row past `bottom`."""
        room = headroom(protected, torch.from_numpy(part[above:above + protected.shape[1]]), maxval,
                        MARGIN + self.reach, self.spread)
        inner = slice(top - above, bottom - above)
        signs = pattern[:, top:bottom].to(protected.dtype)
        return bounded(signs * self.amplitude, room[0][:, inner], room[1][:, inner]) * torch.from_numpy(~part[top:bottom])

    def _setup(self, pixels: np.ndarray) -> tuple[int, np.ndarray, torch.Tensor]:
        """The limit, the field part and the key's ±1 pattern (generated once, read by rows)."""
        height, width, channels = pixels.shape
        return int(np.iinfo(pixels.dtype).max), field_part(self.key, height, width), key_pattern(self.key, height, width)[:channels]

    def couple(self, pixels: np.ndarray) -> Coupled:
        """Protects (H, W, C) integer pixels: the field part first, then the pattern part."""
        maxval, part, pattern = self._setup(pixels)
        known = Known(pixels, part, self.amplitude, self.spread)
        rows = self.field(known)
        result, clipped_at = np.empty_like(pixels), []
        height = pixels.shape[0]
        for top, bottom in bands(height):
            # the pattern's headroom reads the protected field part one row beyond the band
            above, below = max(top - 1, 0), min(bottom + 1, height)
            protected = _planes(pixels[above:below]) + self._field_change(known, rows, above, below)
            out = protected[:, top - above:bottom - above]
            out += self._pattern_change(protected.clamp(0, maxval), part, pattern, maxval, top, bottom, above)
            result[top:bottom] = out.clamp(0, maxval).permute(1, 2, 0).numpy()
            clipped = np.flatnonzero(((out < 0) | (out > maxval)).permute(1, 2, 0).numpy())
            clipped_at.append(clipped + top * pixels.shape[1] * pixels.shape[2])
        clipped_at = np.concatenate(clipped_at)
        return Coupled(result, clipped_at, pixels.reshape(-1)[clipped_at])

    def _without_pattern(self, protected: np.ndarray, part: np.ndarray, pattern: torch.Tensor, maxval: int,
                         keep: np.ndarray | None = None) -> np.ndarray:
        """The image with the pattern part's change undone (clamped to the limits, which is all
        the field reads of it and all an output keeps), or that change itself into `keep`."""
        out, height = np.empty_like(protected), protected.shape[0]
        for top, bottom in bands(height):
            above, below = max(top - 1, 0), min(bottom + 1, height)
            planes = _planes(protected[above:below])
            change = self._pattern_change(planes, part, pattern, maxval, top, bottom, above)
            restored = planes[:, top - above:bottom - above] - change
            out[top:bottom] = restored.clamp(0, maxval).permute(1, 2, 0).numpy()
            if keep is not None:
                keep[top:bottom] = change.permute(1, 2, 0).numpy()
        return out

    def change(self, protected: np.ndarray) -> np.ndarray:
        """The change `couple` made, (H, W, C) integers, as well as a copy of the protected image
        tells it (the headroom is read off the copy, which matters only beside black and white):
        what to subtract from a copy that was recompressed, given the field it was made with."""
        maxval, part, pattern = self._setup(protected)
        change = np.empty(protected.shape, dtype=np.int32)
        known = Known(self._without_pattern(protected, part, pattern, maxval, keep=change), part, self.amplitude, self.spread)
        rows = self.field(known)
        for top, bottom in bands(protected.shape[0]):
            change[top:bottom] += self._field_change(known, rows, top, bottom).permute(1, 2, 0).numpy()
        return change

    def uncouple(self, protected: np.ndarray, clipped_at: np.ndarray | None = None,
                 clipped_values: np.ndarray | None = None) -> np.ndarray:
        """Undoes `couple`: the pattern part with the file and the key, then the field recomputed
        from the restored pattern part. With the record's clipped pixels the result is exact; from
        the file alone a pixel that clipped is off by what it lost (a lone speck by black or white)."""
        maxval, part, pattern = self._setup(protected)
        restored = self._without_pattern(protected, part, pattern, maxval)
        known = Known(restored, part, self.amplitude, self.spread)
        rows = self.field(known)
        for top, bottom in bands(protected.shape[0]):
            planes = _planes(restored[top:bottom]) - self._field_change(known, rows, top, bottom)
            restored[top:bottom] = planes.clamp(0, maxval).permute(1, 2, 0).numpy()
        if clipped_at is not None and len(clipped_at):
            if int(np.max(clipped_at)) >= restored.size or int(np.min(clipped_at)) < 0:
                raise ValueError("the record's clipped pixels lie outside this image: it is not the record of this image")
            restored.reshape(-1)[clipped_at] = clipped_values
        return restored
