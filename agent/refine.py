"""The adversarial field: a few gradient steps against the surrogate on the views a platform's
classifier sees, keyed, and reproducible by the key holder.

A platform's classifier never sees a photo at full size: it sees the shorter side scaled to 256
and the centre 224 (torchvision's standard), or the whole photo squashed to 224×224. So the field
lives at that scale (shorter side 256) and is upsampled bilinearly to the photo; the cost of the
steps does not grow with megapixels. Each step draws what a platform might do (the resizer, a
rescale of 0.5–1×, a small shift of the crop) from a generator seeded by the key, so that the
field holds up under them, and so that without the key nobody can recompute it.

Recovery recomputes the field from the image the coupling estimates (`coupling.py`), so the steps
must give the same field for the same input: they run on a fixed number of threads (float sums
depend on how the work is split), and they are smooth (a soft sign, not a sign), so that the
last bits of float rounding move the field by far less than the half grey level that would
change a rounded pixel.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .coupling import FieldRows, Known, estimate
from .rgan.keying import key_pattern, keystream
from .surrogate import surrogate

if TYPE_CHECKING:
    from .rgan.model import RGAN

_SEED_INFO = b"rgan-agent refine v1"
# the platform's view: shorter side 256, centre 224
VIEW_SHORT, VIEW_SIDE = 256, 224
# the thread count the steps always run on: float results depend on it
THREADS = 2
RESIZERS = ("bilinear", "bicubic", "area")
# up to this many pixels of shift of the crop view, and this share of border cut from the squash view
CROP_JITTER, SQUASH_JITTER = 8, 0.04
# how far past the decision boundary the margin loss keeps pushing (logits)
KAPPA = 8.0
MOMENTUM = 0.9


@dataclass(frozen=True)
class Method:
    """How a version of the refine scheme steps and bounds its field. Records name theirs
    (`METHOD` today), so that photos protected by an earlier one still recover.

    `softness`: a coordinate's step is its gradient over (|gradient| + softness × the mean
    |gradient|): nearly a sign for the coordinates that matter, linear (so smooth) for the ones
    near zero; softer spends less of the bound where the gradient is weak, so the same bound
    costs less PSNR. `standard_views`: every other step sees the standard views, not a draw of
    what platforms vary (a few steps that each see another draw converge on none of them).
    `spread`: the coupling's headroom also shrinks with the spread of a pixel's neighbours,
    which leaves textured regions, where the field does most, nearly no room. `upsample_rows`:
    the field is brought to full size a band of rows at a time (`upsampled_rows`), not a whole
    float32 image at once by Pillow (1 GiB at 24 megapixels)."""

    softness: float
    standard_views: bool
    spread: bool
    upsample_rows: bool


METHODS = {1: Method(0.1, standard_views=False, spread=True, upsample_rows=False),
           2: Method(0.5, standard_views=True, spread=False, upsample_rows=True)}
METHOD = 2


# A protection that does not fool both views of the surrogate is tried again (up to this many
# attempts in all), each time avoiding one more of the estimate's top labels, with a quarter more
# bound and two more steps: the estimate's top label is not always the photo's.
ATTEMPTS = 3


@dataclass(frozen=True)
class Budget:
    """How hard a strength pushes: the field's bound on its part of the pixels (8-bit grey
    levels), the number of steps, and the key pattern's amplitude on the other part (levels)."""

    epsilon: float
    steps: int
    pattern: int

    def attempt(self, number: int) -> Budget:
        """The budget of attempt `number` (0 first)."""
        return replace(self, epsilon=self.epsilon * (1 + 0.25 * number), steps=self.steps + 2 * number)

    @property
    def reach(self) -> int:
        """The most any attempt's field changes a pixel, in whole levels."""
        return int(np.ceil(self.attempt(ATTEMPTS - 1).epsilon))


# torch's thread count is the process's: one protection at a time sets it (the service protects
# from several threads), and two at once would only share the same cores and memory anyway.
# Reentrant: the pipeline holds it around a whole protection, the steps take it again.
_THREADS_LOCK = threading.RLock()


@contextlib.contextmanager
def fixed_threads(count: int = THREADS) -> Iterator[None]:
    with _THREADS_LOCK:
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def key_generator(key: bytes, attempt: int = 0) -> torch.Generator:
    seed = int.from_bytes(keystream(key, 8, _SEED_INFO + bytes([attempt])), "little") & (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _scaled(height: int, width: int, short: int) -> tuple[int, int]:
    ratio = short / min(height, width)
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def field_size(height: int, width: int) -> tuple[int, int]:
    """The field's (height, width): the photo's aspect ratio at the view's scale (shorter side
    256), or the photo's own size if it is smaller."""
    return (height, width) if min(height, width) <= VIEW_SHORT else _scaled(height, width, VIEW_SHORT)


def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "area" and size[0] <= images.shape[-2] and size[1] <= images.shape[-1]:
        return F.interpolate(images, size=size, mode="area")
    # area averaging only makes sense downwards; upwards it is bilinear
    mode = "bilinear" if mode == "area" else mode
    return F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False)


def views(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Both 224×224 views of each image, (2N, 3, 224, 224), crop views first. With a generator,
    the resizer and small shifts of both views are drawn from it (what platforms vary)."""
    height, width = images.shape[-2:]
    if generator is None:
        mode, shift_y, shift_x, cut_y, cut_x = "bilinear", 0, 0, 0, 0
    else:
        draws = torch.rand(5, generator=generator).tolist()
        mode = RESIZERS[min(int(draws[0] * len(RESIZERS)), len(RESIZERS) - 1)]
        shift_y, shift_x = (round((2 * d - 1) * CROP_JITTER) for d in draws[1:3])
        cut_y, cut_x = round(draws[3] * SQUASH_JITTER * height), round(draws[4] * SQUASH_JITTER * width)
    scaled = _resize(images, tuple(max(VIEW_SHORT, side) for side in _scaled(height, width, VIEW_SHORT)), mode)
    top = min(max((scaled.shape[-2] - VIEW_SIDE) // 2 + shift_y, 0), scaled.shape[-2] - VIEW_SIDE)
    left = min(max((scaled.shape[-1] - VIEW_SIDE) // 2 + shift_x, 0), scaled.shape[-1] - VIEW_SIDE)
    crop = scaled[..., top:top + VIEW_SIDE, left:left + VIEW_SIDE]
    squash = _resize(images[..., cut_y:height - cut_y, cut_x:width - cut_x], (VIEW_SIDE, VIEW_SIDE), mode)
    return torch.cat([crop, squash])


def _margin(logits: torch.Tensor, avoid: torch.Tensor) -> torch.Tensor:
    """How far each view still is from leaving the labels `avoid` (negative once it has), floored
    at −KAPPA."""
    inside = logits.gather(1, avoid).amax(1)
    outside = logits.scatter(1, avoid, float("-inf")).amax(1)
    return (inside - outside).clamp(min=-KAPPA)


def resample(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) float32 → (C, H, W), bilinear (antialiased downwards) by Pillow: single-threaded
    C in a fixed order, so the same on every machine."""
    if planes.shape[1:] == (height, width):
        return planes.astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
                                .resize((width, height), Image.Resampling.BILINEAR)) for plane in planes])


def _bilinear_taps(size: int, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel-centred bilinear upsampling from `size` to `out` samples (torch's
    align_corners=False): each output's two source indices and the second one's weight."""
    source = np.maximum((np.arange(out) + 0.5) * (size / out) - 0.5, 0)
    first = np.minimum(np.floor(source).astype(np.int64), size - 1)
    return first, np.minimum(first + 1, size - 1), (source - first).astype(np.float32)


def upsampled_rows(field: np.ndarray, height: int, width: int) -> FieldRows:
    """(C, h, w) float32 → rows of its bilinear upsampling to (C, height, width), any band of
    rows the same as in the whole: across the columns once (h rows, cheap), down the rows on
    demand. Separate float32 multiplies and adds in a fixed order: the same on every machine."""
    left, right, weight = _bilinear_taps(field.shape[2], width)
    across = field[:, :, left] * (1 - weight) + field[:, :, right] * weight
    top_taps = _bilinear_taps(field.shape[1], height)

    def rows(top: int, bottom: int) -> torch.Tensor:
        upper, lower, down = (taps[top:bottom] for taps in top_taps)
        down = down[None, :, None]
        return torch.from_numpy(across[:, upper] * (1 - down) + across[:, lower] * down)

    return rows


def applied_rows(field: np.ndarray, maxval: int, height: int, width: int, method: Method) -> FieldRows:
    """The change a field in whole 8-bit levels ((3, h, w) int8) makes to a (height, width) photo
    of `maxval`, as `method` brings it to full size: numpy or Pillow arithmetic in a fixed order,
    so the same field gives the same rows on every machine."""
    scaled = field.astype(np.float32) * (maxval / 255)
    if method.upsample_rows:
        return upsampled_rows(scaled, height, width)
    planes = resample(scaled, height, width)
    return lambda top, bottom: torch.from_numpy(planes[:, top:bottom])


# Photos whose shorter side is at most this are rendered at full size during the steps, with the
# field on its part of the pixels exactly as it will be applied; larger ones at the view's scale,
# where the part's half of the pixels averages to half the field.
FULL_RENDER_SHORT = 2 * VIEW_SHORT


def proposal(model: RGAN, image: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """G's learned share for `image` (1, 3, h, w) on [0, 1], on [−1, 1] of its bound: in eval mode
    and on the CPU whatever the model's own state (the key holder recomputes it there), leaving the
    model as it was."""
    model = getattr(model, "model", model)  # a service's micro-batching wrapper
    cpu = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    training = cpu.training
    cpu.eval()
    try:
        with torch.no_grad():
            return cpu.learned_perturbation(image, pattern) / cpu.config.generator_bound
    finally:
        cpu.train(training)


class Refinement:
    """The field part's change for one protection (a `coupling.FieldFn`): the field at the view's
    scale in whole 8-bit levels, after `budget.steps` steps from G's proposal (`model`, a keyed
    RGAN) or, without one, from a keyed random start. `field` keeps the last field computed, which
    the record holds for copies that were recompressed."""

    def __init__(self, key: bytes, budget: Budget, maxval: int, model: RGAN | None = None, attempt: int = 0,
                 method: Method = METHODS[METHOD]):
        self.key, self.budget, self.maxval, self.model, self.attempt = key, budget.attempt(attempt), maxval, model, attempt
        self.method = method
        self.field: np.ndarray | None = None

    def __call__(self, known: Known) -> FieldRows:
        height, width = known.shape
        with fixed_threads(), torch.enable_grad():
            field = self._steps(known)
        self.field = field
        return applied_rows(field, self.maxval, height, width, self.method)

    def _base(self, known: Known) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The image the steps start from, on [0, 1], with the field part's headroom when it is at
        full size: at full size with the field part estimated from its neighbours, or at the view's
        scale, each pixel the mean of the known pixels under the resizer's footprint (at half
        density and two or more pixels a footprint, as good as the whole image's downscale), one
        channel at a time."""
        height, width = known.shape
        if min(height, width) <= FULL_RENDER_SHORT:
            planes, mask, room = known.whole()
            return (estimate(planes, mask) / self.maxval)[None], room
        size = _scaled(height, width, VIEW_SHORT)
        total = np.concatenate([resample(plane[None], *size) for plane in known.planes()])
        weight = resample((~known.part).astype(np.float32)[None], *size)
        return torch.from_numpy(total / np.maximum(weight, 1e-6))[None], None

    def start(self, base: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Where the steps begin, on [−1, 1] of the bound, at the field's size: G's proposal on the
        base brought to that size (G at the view's scale, where the platform's classifier looks),
        or keyed noise of half the bound."""
        fh, fw = field_size(*base.shape[-2:])
        noise = torch.rand((1, 3, fh, fw), generator=generator) * 2 - 1
        if self.model is None or not self.model.config.keyed:
            return 0.5 * noise
        small = torch.from_numpy(resample(base[0].numpy(), fh, fw))[None]
        return proposal(self.model, small, key_pattern(self.key, fh, fw))

    def _steps(self, known: Known) -> np.ndarray:
        height, width = known.shape
        generator = key_generator(self.key, self.attempt)
        classifier = surrogate()
        base, room = self._base(known)
        full = room is not None
        if full:
            part = torch.from_numpy(known.part)[None, None].float()
            low, high = (room[0] / self.maxval)[None], (room[1] / self.maxval)[None]
        with torch.no_grad():
            avoid = classifier(views(base)).topk(1 + self.attempt, dim=1).indices
        epsilon = self.budget.epsilon / 255
        field = self.start(base, generator) * epsilon
        step = 2.5 * epsilon / max(self.budget.steps, 1)
        velocity = torch.zeros_like(field)
        for number in range(self.budget.steps):
            field.requires_grad_(True)
            if full:
                spread = F.interpolate(field, size=(height, width), mode="bilinear", align_corners=False)
                rendered = base + part * torch.maximum(torch.minimum(spread, high), low)
                # a platform may shrink a small photo before its classifier sees it
                scale = 0.5 + 0.5 * torch.rand((), generator=generator).item()
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                rendered = F.interpolate(rendered, size=size, mode="bilinear", antialias=True, align_corners=False)
            else:
                rendered = base + 0.5 * F.interpolate(field, size=base.shape[-2:], mode="bilinear", align_corners=False)
            standard = self.method.standard_views and number % 2 == 0
            loss = _margin(classifier(views(rendered, None if standard else generator)), avoid).sum()
            (grad,) = torch.autograd.grad(loss, field)
            with torch.no_grad():
                velocity = MOMENTUM * velocity + grad / grad.abs().mean().clamp(min=1e-12)
                soft = velocity / (velocity.abs() + self.method.softness * velocity.abs().mean().clamp(min=1e-12))
                field = (field.detach() - step * soft).clamp(-epsilon, epsilon)
        # whole levels: what the record keeps is exactly what was applied
        return np.rint(field[0].numpy() * 255).astype(np.int8)
