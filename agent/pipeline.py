"""Protect and recover real photos of any size with the user's key: the library API under the
CLI and the service.

A photo is brought to its working resolution (never upscaled) and its colour channels are
protected by the *refine* scheme: G's proposal plus a few steps against the surrogate on the
views a platform's classifier sees (`refine.py`), applied by a keyed additive coupling that the
key holder undoes exactly (`coupling.py`). What recovery needs to know about the original (sizes,
channel layout, bit depth, strength, attempt) is returned as `ProtectInfo`, and what the record
keeps for copies that were recompressed (the field, the pixels that clipped) as its `recovery`.
A photo that was downscaled for protection gets back its working-size image, not its pixels.

Photos protected by the first model (the *rgan* scheme: G + DR, R's estimate refined with G)
still recover through the same call; their records say so by having no scheme. That path runs
large photos tile by tile: the networks are fully convolutional with batch normalisation, a
fixed per-channel affine map in eval mode, so a tile with enough context around it gives the same
centre as the whole image does, while memory stays bounded by the tile size.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .coupling import Coupling, FieldRows, Known, estimate, field_part
from .images import BIT_DEPTHS, MAX_PIXELS, MODES, resize
from .jpeg import Quantization, most_likely_original
from .keys import check_key
from .recovery import RecoveryData
from . import selfcheck
from .refine import (ATTEMPTS, METHOD, METHODS, Budget, Method, Refinement, applied_rows, field_size, fixed_threads,
                     upsampled_rows)
from .rgan.keying import PATTERN_VERSION, key_pattern
from .rgan.model import RGAN, load_model
from .rgan.nets import ENCODER_STRIDE

# the shipped photo model, used wherever no model is given
DEFAULT_MODEL_PATH = Path(str(resources.files("agent") / "weights" / "photo-rgan.safetensors"))
# Tile origins are kept on this grid (see `_alignment`), so the tile size must lie on it too.
TILE_GRID = 16
# What each strength spends (`refine.Budget`: the field's bound in grey levels on its half of the
# pixels, the steps, the key pattern's amplitude on the other half). Stronger fools more
# classifiers and is more visible; docs/benchmarks.md has the figures.
STRENGTHS = {"low": Budget(3.0, 4, 1), "medium": Budget(5.5, 5, 1), "high": Budget(10.0, 6, 2)}
# the strengths of earlier refine methods, by method: a record keeps its budget, but a photo
# recovered without its record is searched for among them
EARLIER_STRENGTHS = {1: {"low": Budget(3.0, 4, 1), "medium": Budget(6.0, 5, 1), "high": Budget(10.0, 6, 2)}}
DEFAULT_STRENGTH = "medium"
# how many of the refine scheme's attempts (`refine.ATTEMPTS`) protection may make
PROTECT_ATTEMPTS = ATTEMPTS
# the schemes: "refine" protects today; "rgan" is the first model's (G + DR, recovered by R), whose
# records still recover
SCHEMES = ("rgan", "refine")
# the rgan scheme: how much of G's learned share went into the photo at each strength
RGAN_STRENGTHS = {"low": 0.5, "medium": 1.0, "high": 1.5}
# the rgan scheme: fixed-point steps after R (RGAN.refine_step), which reach what clipping and
# rounding leave
REFINE_STEPS = 2


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ProtectOptions:
    """How a photo is brought to its working resolution and how inference is split into tiles.

    The working resolution bounds both the cost of protection and what a platform would keep
    anyway (they downscale uploads); `None` protects at full size. Tiling changes nothing in the
    result (within one grey level of rounding), only the memory it takes.
    """

    max_side: int | None = 2048
    strength: str = DEFAULT_STRENGTH
    tile: int = 1024
    # context on each side of a tile, rounded up to the tile grid; it covers the networks' reach
    # (86 px for the photo model's G, 44 for R), so the tiles' centres are exact
    overlap: int = 96
    tile_above: int = 2048 * 2048

    def __post_init__(self) -> None:
        if self.strength not in STRENGTHS:
            raise ValueError(f"strength must be one of {', '.join(STRENGTHS)}, got {self.strength!r}")
        if self.max_side is not None and (not _is_int(self.max_side) or self.max_side < TILE_GRID):
            raise ValueError(f"max_side must be None or an integer of at least {TILE_GRID}, got {self.max_side!r}")
        if not _is_int(self.tile) or self.tile < TILE_GRID or self.tile % TILE_GRID:
            raise ValueError(f"tile must be a positive multiple of {TILE_GRID}, got {self.tile!r}")
        if not _is_int(self.overlap) or self.overlap < 0:
            raise ValueError(f"overlap must be a non-negative integer, got {self.overlap!r}")
        if not _is_int(self.tile_above) or self.tile_above < 1:
            raise ValueError(f"tile_above must be a positive number of pixels, got {self.tile_above!r}")


@dataclass(frozen=True)
class ProtectInfo:
    """What recovery needs to know about a protected photo, and what provenance records of it.

    Sizes are (width, height). `mode` is the original channel layout: grayscale photos are
    protected (and stay) in colour, and recovery turns them back into grayscale.
    """

    original_size: tuple[int, int]
    working_size: tuple[int, int]
    mode: str
    bit_depth: int
    key_pattern_version: int = PATTERN_VERSION
    strength: str = DEFAULT_STRENGTH
    scheme: str = "rgan"
    # which of the refine scheme's attempts fooled the surrogate (`refine.ATTEMPTS`)
    attempt: int = 0
    # the refine scheme's budget as protection spent it (epsilon, steps, pattern): recovery redoes
    # exactly that, whatever the strengths say later
    budget: tuple[float, int, int] | None = None
    # the refine method (`refine.METHODS`) that protected; the first one's records do not say
    method: int = 1
    # what the record keeps, sealed, beside this info (not part of it: not in `to_dict`)
    recovery: RecoveryData | None = field(default=None, compare=False, repr=False)
    # the field the refine scheme applied ((3, h, w) int8 levels), which a lossless output carries
    # sealed (`recovery.seal_field`); not part of the info either
    applied_field: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("original_size", "working_size"):
            size = getattr(self, name)
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(_is_int(side) and side >= 1 for side in size)):
                raise ValueError(f"{name} must be (width, height) in positive integers, got {size!r}")
            object.__setattr__(self, name, tuple(size))
        if any(work > orig for work, orig in zip(self.working_size, self.original_size)):
            raise ValueError(f"working size {self.working_size} is larger than the original "
                             f"{self.original_size}; photos are never upscaled")
        if self.mode not in MODES.values():
            raise ValueError(f"mode must be one of {', '.join(MODES.values())}, got {self.mode!r}")
        if self.bit_depth not in BIT_DEPTHS.values() or not _is_int(self.bit_depth):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth!r}")
        if not _is_int(self.key_pattern_version) or self.key_pattern_version < 1:
            raise ValueError(f"key_pattern_version must be a positive integer, got {self.key_pattern_version!r}")
        if self.strength not in STRENGTHS:
            raise ValueError(f"strength must be one of {', '.join(STRENGTHS)}, got {self.strength!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if not _is_int(self.attempt) or not 0 <= self.attempt < ATTEMPTS or (self.attempt and self.scheme != "refine"):
            raise ValueError(f"attempt must be an integer in 0..{ATTEMPTS - 1} (refine scheme only), got {self.attempt!r}")
        if self.scheme == "refine":
            budget = self.budget
            if (not isinstance(budget, (tuple, list)) or len(budget) != 3 or isinstance(budget[0], bool)
                    or not isinstance(budget[0], (int, float)) or not 0 < budget[0] <= 32
                    or not all(_is_int(v) and 0 <= v <= 64 for v in budget[1:])):
                raise ValueError(f"budget must be (epsilon in (0, 32], steps, pattern), got {budget!r}")
            object.__setattr__(self, "budget", (float(budget[0]), int(budget[1]), int(budget[2])))
            if not _is_int(self.method) or self.method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(map(str, METHODS))}, got {self.method!r}")
        elif self.budget is not None or self.method != 1:
            raise ValueError("only the refine scheme has a budget and a method")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "original_size": list(self.original_size),
            "working_size": list(self.working_size),
            "mode": self.mode,
            "bit_depth": self.bit_depth,
            "key_pattern_version": self.key_pattern_version,
            "strength": self.strength,
        }
        # the rgan scheme's records were written before schemes existed, and keep that form
        if self.scheme != "rgan":
            out.update(scheme=self.scheme, attempt=self.attempt, budget=list(self.budget))
            if self.method != 1:
                out.update(method=self.method)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProtectInfo:
        """Reads what `to_dict` wrote, typically back from JSON; anything else is a ValueError
        rather than a recovery that silently goes wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"protect info must be a dict, got {type(data).__name__}")
        fields = {"original_size", "working_size", "mode", "bit_depth", "key_pattern_version", "strength"}
        # records written before strengths existed were all protected at the default, and those
        # written before schemes existed by the rgan scheme, and those of the first refine method
        # before methods existed
        refined = {"scheme", "attempt", "budget"}
        allowed = (fields, fields - {"strength"}, fields | refined, fields | refined | {"method"})
        if set(data) not in allowed:
            missing, unknown = sorted(fields - set(data)), sorted(set(data) - fields - refined - {"method"})
            raise ValueError(f"protect info fields do not match (missing: {missing}, unknown: {unknown})")
        return cls(**data)


@functools.cache
def default_model() -> RGAN:
    """The shipped photo model, loaded once per process."""
    if not DEFAULT_MODEL_PATH.is_file():
        raise FileNotFoundError(f"the default photo model {DEFAULT_MODEL_PATH} is not installed; "
                                f"pass a model explicitly or install the photo weights")
    model, _ = load_model(DEFAULT_MODEL_PATH)
    return model


def protect(image: np.ndarray, key: bytes, options: ProtectOptions = ProtectOptions(),
            model: RGAN | None = None, *, original_size: tuple[int, int] | None = None) -> tuple[np.ndarray, ProtectInfo]:
    """Protects a photo ((H, W) or (H, W, C) uint8/uint16) with the key, by the refine scheme;
    `model` (a keyed RGAN, by default the shipped one) proposes where the steps start. With
    `original_size` (width, height), `image` is already that photo's `working_copy`: a caller that
    needs the working copy too resizes once.

    Returns the protected image at working resolution, in colour (RGB or RGBA, same dtype), and
    the `ProtectInfo` that recovery and provenance need (its `recovery`: what the record keeps
    sealed). Alpha is carried over untouched. Attempts are made until both views of the surrogate
    are fooled (at most `refine.ATTEMPTS`); the info says which one was kept.
    """
    pixels, mode, (width, height), (work_w, work_h) = _working(image, key, options, original_size)
    colour, alpha = _split(pixels)
    # Grayscale photos come back in colour: the classifiers look at colour, and the field is per
    # channel; the three channels of a grey original recover identical, so recovery gives the grey
    # back exactly.
    colour = np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour
    budget = STRENGTHS[options.strength]
    net = default_model() if model is None else model
    with fixed_threads():
        clean = selfcheck.labels(colour)
        for attempt in range(PROTECT_ATTEMPTS):
            refinement = Refinement(key, budget, np.iinfo(colour.dtype).max, net, attempt, METHODS[METHOD])
            coupled = _coupling(key, budget, refinement, colour.dtype, METHODS[METHOD]).couple(colour)
            fooled = selfcheck.labels(coupled.pixels)
            if all(fooled[view] != label for view, label in clean.items()):
                break
    protected = coupled.pixels
    result = protected if alpha is None else np.concatenate([protected, alpha], axis=2)
    recovery = RecoveryData.keep(refinement.field, coupled.clipped_at, coupled.clipped_values,
                                 RecoveryData.luma_step_for(refinement.budget.epsilon))
    return result, ProtectInfo((width, height), (work_w, work_h), mode, BIT_DEPTHS[pixels.dtype],
                               strength=options.strength, scheme="refine", attempt=attempt,
                               budget=(budget.epsilon, budget.steps, budget.pattern), method=METHOD,
                               recovery=recovery, applied_field=refinement.field)


def protect_rgan(image: np.ndarray, key: bytes, options: ProtectOptions = ProtectOptions(),
                 model: RGAN | None = None) -> tuple[np.ndarray, ProtectInfo]:
    """The rgan scheme's protection (G + DR conditioned on the key's pattern, tile by tile above
    `options.tile_above`): what the first model made, kept so that such files can be made again,
    to check that they still recover and to evaluate that model (`agent eval`)."""
    pixels, mode, (width, height), (work_w, work_h) = _working(image, key, options)
    colour, alpha = _split(pixels)
    with _inference(model) as net:
        strength = RGAN_STRENGTHS[options.strength]
        protected = _run(colour, key, net, options, lambda x, pattern: x + net.perturbation(x, pattern, strength))
    result = protected if alpha is None else np.concatenate([protected, alpha], axis=2)
    return result, ProtectInfo((width, height), (work_w, work_h), mode, BIT_DEPTHS[pixels.dtype],
                               strength=options.strength)


def _working(image: np.ndarray, key: bytes, options: ProtectOptions, original_size: tuple[int, int] | None = None):
    """The checked image at its working resolution, its layout, original and working sizes
    (`image` is already at the working size when the original's is given)."""
    pixels, mode = _check_image(image)
    check_key(key)
    height, width = pixels.shape[:2]
    original = (width, height) if original_size is None else tuple(original_size)
    work = working_size(*original, options.max_side)
    if work != (width, height):
        if original_size is not None:
            raise ValueError(f"the image is {width}×{height}, not the working size {work[0]}×{work[1]} "
                             f"of a {original[0]}×{original[1]} photo")
        pixels = resize(pixels, *work)
    return pixels, mode, original, work


def _coupling(key: bytes, budget: Budget, field: Any, dtype: np.dtype, method: Method) -> Coupling:
    unit = np.iinfo(dtype).max // 255
    return Coupling(key, field, budget.pattern * unit, budget.reach, method.spread)


def recover(image: np.ndarray, key: bytes, info: ProtectInfo | None = None, model: RGAN | None = None,
            *, options: ProtectOptions = ProtectOptions(), jpeg: Quantization | None = None,
            recovery: RecoveryData | None = None, copy: bool | None = None,
            applied_field: np.ndarray | None = None) -> np.ndarray:
    """Undoes the protection with the key (and, for the rgan scheme, the model that protected).

    From the protected pixels themselves (a PNG, a lossless WebP) the refine scheme is undone
    exactly: the key pattern, then the field recomputed from the restored half. A *copy* (`copy`;
    by default, whenever `jpeg` tables are given) holds other pixels, from which the field cannot
    be recomputed: the field the record kept (`recovery`) is subtracted instead, and with `jpeg`
    (the tables of the unresized JPEG the pixels came from) the file's rounding narrows the
    estimate further (`jpeg.most_likely_original`).

    From the protected pixels, the field itself (`applied_field`: the file's seal, opened; or
    the one a first-method record holds) is subtracted rather than recomputed, which makes the
    recovery exact on any machine; recomputing is exact only where the float arithmetic matches
    the machine's that protected (`recovery.py`).

    Without `info` (no record) the refine scheme is assumed, and every strength and attempt is
    tried: the one that leaves the field half smoothest against the other half is kept.

    The result has the protected image's size (the working resolution: pixels dropped by a
    downscale before protection cannot come back) and dtype. With `info`, the image must still
    have the working size, and a grayscale original comes back grayscale ((H, W) or (H, W, 2)).
    For the rgan scheme only the tiling fields and the strength of `options` apply.
    """
    pixels, mode = _check_image(image)
    check_key(key)
    height, width = pixels.shape[:2]
    if info is not None:
        if info.working_size != (width, height):
            raise ValueError(f"the image is {width}×{height} but was protected at "
                             f"{info.working_size[0]}×{info.working_size[1]}; recovery needs the "
                             f"protected image at its own size (was it resized?)")
        if info.key_pattern_version != PATTERN_VERSION:
            raise ValueError(f"the image was protected with key pattern version {info.key_pattern_version}; "
                             f"this agent makes version {PATTERN_VERSION}")
    colour, alpha = _split(pixels)
    colour = np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour
    copy = jpeg is not None if copy is None else copy
    net = default_model() if model is None else model
    if info is not None and info.scheme == "rgan":
        recovered = _recover_rgan(colour, key, RGAN_STRENGTHS[info.strength], net, options, jpeg)
    elif copy and recovery is not None:
        with fixed_threads():
            recovered = _recover_copy(colour, key, info, recovery, jpeg)
    elif info is not None:
        with fixed_threads():
            recovered = _uncouple(colour, key, Budget(*info.budget), info.attempt, METHODS[info.method], net, recovery,
                                  applied_field)
    else:
        with fixed_threads():
            recovered = _recover_unknown(colour, key, net, applied_field)
    if (info.mode if info is not None else mode) in ("L", "LA"):
        # the three channels were protected apart; their mean is the best estimate of the one
        grey = np.rint(recovered.mean(axis=2, dtype=np.float64)).astype(pixels.dtype)
        return grey if alpha is None else np.stack([grey, alpha[..., 0]], axis=2)
    return recovered if alpha is None else np.concatenate([recovered, alpha], axis=2)


def _uncouple(colour: np.ndarray, key: bytes, budget: Budget, attempt: int, method: Method, net: RGAN,
              recovery: RecoveryData | None = None, applied_field: np.ndarray | None = None) -> np.ndarray:
    maxval = np.iinfo(colour.dtype).max
    if applied_field is None and recovery is not None:
        applied_field = recovery.exact
    if applied_field is None:
        field: Any = Refinement(key, budget, maxval, net, attempt, method)
    else:
        height, width = colour.shape[:2]
        if applied_field.shape != (3, *field_size(height, width)):
            raise ValueError(f"the kept field is {applied_field.shape[2]}×{applied_field.shape[1]}, but this "
                             f"image's is {field_size(height, width)[1]}×{field_size(height, width)[0]}: "
                             "it is not the field of this image")
        field = lambda known: applied_rows(applied_field, maxval, height, width, method)  # noqa: E731
    clipped = (recovery.clipped_at, recovery.clipped_values) if recovery is not None else (None, None)
    return _coupling(key, budget, field, colour.dtype, method).uncouple(colour, *clipped)


def _recover_unknown(colour: np.ndarray, key: bytes, net: RGAN, applied_field: np.ndarray | None = None) -> np.ndarray:
    """Every method, strength and attempt tried, today's method first; kept: the one whose
    field half differs least from what the other half predicts of it (a wrong guess leaves a field
    there, the right one none)."""
    best, best_roughness = colour, math.inf
    for method in sorted(METHODS, key=lambda number: number != METHOD):
        for budget in (STRENGTHS if method == METHOD else EARLIER_STRENGTHS[method]).values():
            for attempt in range(PROTECT_ATTEMPTS):
                candidate = _uncouple(colour, key, budget, attempt, METHODS[method], net, applied_field=applied_field)
                roughness = _roughness(candidate, key)
                if roughness < best_roughness:
                    best, best_roughness = candidate, roughness
    return best


def _roughness(colour: np.ndarray, key: bytes) -> float:
    part = torch.from_numpy(field_part(key, *colour.shape[:2]))
    planes = torch.from_numpy(np.ascontiguousarray(colour.transpose(2, 0, 1)).astype(np.int32))
    predicted = estimate(planes, ~part)
    return float(((planes.float() - predicted).abs() * part).sum() / part.sum().clamp(min=1))


def _recover_copy(colour: np.ndarray, key: bytes, info: ProtectInfo | None, recovery: RecoveryData,
                  jpeg: Quantization | None) -> np.ndarray:
    """A copy minus the change protection made, rebuilt from the record's field and the key (the
    headroom read off the copy, which only matters beside black and white)."""
    budget = Budget(*info.budget) if info is not None else STRENGTHS[DEFAULT_STRENGTH]
    maxval = np.iinfo(colour.dtype).max

    kept = recovery.field() * np.float32(maxval / 255)

    def kept_field(known: Known) -> FieldRows:
        return upsampled_rows(kept, *known.shape)

    method = METHODS[info.method if info is not None else METHOD]
    change = _coupling(key, budget, kept_field, colour.dtype, method).change(colour)
    if jpeg is not None and colour.dtype == np.uint8:
        return most_likely_original(colour, change, jpeg)
    # A copy's codec or resizer kept the field, which is smooth, but not the pixel-to-pixel
    # alternation between the two halves: what is subtracted is the change averaged over 3×3
    # (1 dB better than the change itself on JPEG-90 4:2:0 copies, bench/quality.py).
    planes = torch.from_numpy(change.transpose(2, 0, 1).astype(np.float32))[None]
    smooth = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(planes, (1, 1, 1, 1), mode="replicate"), 3, 1)
    estimate = colour.astype(np.float64) - smooth[0].permute(1, 2, 0).numpy()
    return np.clip(np.rint(estimate), 0, maxval).astype(colour.dtype)


def _recover_rgan(colour: np.ndarray, key: bytes, strength: float, net: RGAN, options: ProtectOptions,
                  jpeg: Quantization | None) -> np.ndarray:
    """The rgan scheme: the image minus R's estimate of the perturbation, then `REFINE_STEPS`
    fixed-point steps with G (`RGAN.refine_step`), and with `jpeg` the file's rounding."""
    with _inference(net) as net:
        recovered = _run(colour, key, net, options, lambda x, pattern: net.recover(x, pattern, strength))
        for _ in range(REFINE_STEPS):
            # each step is a whole pass over the image, so tiles see each other's latest estimate
            recovered = _run(recovered, key, net, options,
                             lambda x, pattern, protected: net.refine_step(x, protected, pattern, strength),
                             also=colour)
        if jpeg is not None and colour.dtype == np.uint8:
            reprotected = _run(recovered, key, net, options,
                               lambda x, pattern: x + net.perturbation(x, pattern, strength))
            recovered = most_likely_original(colour, reprotected.astype(np.int16) - recovered, jpeg)
    return recovered


def working_copy(image: np.ndarray, options: ProtectOptions = ProtectOptions()) -> np.ndarray:
    """The photo at the working resolution `protect` would use: what recovery gives back."""
    pixels, _ = _check_image(image)
    height, width = pixels.shape[:2]
    size = working_size(width, height, options.max_side)
    return pixels if size == (width, height) else resize(pixels, *size)


# --- arrays -----------------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> tuple[np.ndarray, str]:
    """The image as (H, W, C) and its layout name, or a ValueError that says what is wrong."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"an image must be a numpy array, got {type(image).__name__}")
    if image.dtype not in BIT_DEPTHS:
        raise ValueError(f"image dtype must be uint8 or uint16, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or not 1 <= image.shape[2] <= 4:
        raise ValueError(f"an image must be (H, W) or (H, W, C) with 1 to 4 channels, got shape {image.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"the image is empty (shape {image.shape})")
    if height * width > MAX_PIXELS:
        raise ValueError(f"the image has {width}×{height} = {height * width:,} pixels; at most "
                         f"{MAX_PIXELS:,} are accepted")
    return image, MODES[image.shape[2]]


def working_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    long_side = max(width, height)
    if max_side is None or long_side <= max_side:
        return width, height
    scale = max_side / long_side
    if width >= height:
        return max_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_side


def _split(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(colour channels: 1 or 3, alpha or None), both views: nothing is copied."""
    channels = pixels.shape[2]
    colour = pixels[:, :, :3] if channels >= 3 else pixels[:, :, :1]
    alpha = pixels[:, :, channels - 1:] if channels in (2, 4) else None
    return colour, alpha


# --- inference --------------------------------------------------------------------------------


@contextlib.contextmanager
def _inference(model: RGAN | None) -> Iterator[RGAN]:
    """The model in eval mode under inference mode, restoring its training flag afterwards so a
    caller's model in the middle of training is left as it was found."""
    net = default_model() if model is None else model
    if not net.config.keyed:
        raise ValueError("the pipeline protects with a key, and this model is not keyed")
    training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            yield net
    finally:
        net.train(training)


def _alignment(net: RGAN) -> int:
    """Shifting the input commutes with the networks only by multiples of every stride in them:
    G's total (4 × g_stride, 8 for the photo model), R's 4 and DR's kernel. Tile origins stay on
    a multiple of those and of the tile grid."""
    config = net.config
    kernel = config.reducer.kernel if config.reducer.down else 1
    return math.lcm(TILE_GRID, ENCODER_STRIDE * config.g_stride, ENCODER_STRIDE, kernel)


def _spans(length: int, step: int, context: int) -> list[tuple[int, int, int, int]]:
    """(context start, context end, core start, core end) along one axis."""
    return [(max(0, start - context), min(length, start + step + context), start, min(length, start + step))
            for start in range(0, length, step)]


def _run(colour: np.ndarray, key: bytes, net: RGAN, options: ProtectOptions,
         step_fn: Callable[..., torch.Tensor], also: np.ndarray | None = None) -> np.ndarray:
    """Applies `step_fn(x, pattern)` (x on [0, 1], (1, 3, h, w)) over the image, tile by tile
    above `options.tile_above` pixels, and returns it rounded to the image's grid as (H, W, 3).
    With `also` (an image of the same shape), `step_fn(x, pattern, also's tile)`."""
    height, width = colour.shape[:2]
    maxval = np.iinfo(colour.dtype).max
    # One pattern for the whole image, sliced per tile: the pattern is a function of the image's
    # size, so tiles must not make their own.
    pattern = key_pattern(key, height, width)
    if height * width > options.tile_above:
        if net.config.norm != "batch":
            raise ValueError("this model normalises over the whole image (instance norm), so it cannot "
                             "be run tile by tile; raise tile_above or use a batch-norm model")
        align = _alignment(net)
        step = -(-options.tile // align) * align
        context = -(-options.overlap // align) * align
        rows, cols = _spans(height, step, context), _spans(width, step, context)
    else:
        rows, cols = [(0, height, 0, height)], [(0, width, 0, width)]
    device = next(net.parameters()).device

    def tile_of(array: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        tile = torch.from_numpy(array[y0:y1, x0:x1].astype(np.float32))
        return (tile.to(device).permute(2, 0, 1)[None] / maxval).expand(1, 3, -1, -1)

    out = np.empty((height, width, 3), dtype=colour.dtype)
    for y0, y1, cy0, cy1 in rows:
        for x0, x1, cx0, cx1 in cols:
            extra = () if also is None else (tile_of(also, y0, y1, x0, x1),)
            result = step_fn(tile_of(colour, y0, y1, x0, x1),
                             pattern[:, y0:y1, x0:x1].to(device=device, dtype=torch.float32), *extra)
            core = result[0, :, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0].clamp(0, 1) * maxval
            out[cy0:cy1, cx0:cx1] = core.round().permute(1, 2, 0).cpu().numpy().astype(colour.dtype)
    return out
