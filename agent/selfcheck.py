"""The self-check: does a protection fool the bundled classifier the way a platform would run it?

A platform's classifier never sees a photo at full size: it sees torchvision's standard crop
(shorter side 256, centre 224) or the whole photo squashed to 224×224 (`rgan.transforms.platform_view`).
At protect time both views of the original and of the protected image are classified; a view is
*fooled* when the top-1 label changed. The record keeps which views were fooled and, for those
only, the label the protected image gets: a wrong label by construction, so the log says nothing
true about what the photo shows. `agent check` on a copy later asks whether the copy still gets
those labels (a recompressed or resized copy may lose the protection).

The classifier is the surrogate protection attacks (torchvision's ImageNet MobileNetV2, shipped
with the agent: `surrogate.py`); without its weights file the self-check is skipped (None), never
a failure.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .rgan.transforms import platform_view

VIEWS = ("crop", "squash")


@functools.cache
def _classifier() -> torch.nn.Module | None:
    from .surrogate import surrogate

    try:
        return surrogate()
    except FileNotFoundError:
        return None


def available() -> bool:
    return _classifier() is not None


@torch.no_grad()
def labels(pixels: np.ndarray) -> dict[str, int] | None:
    """Top-1 ImageNet label of each platform view of an image as the pipeline holds it (grey or
    colour, 8 or 16 bits, alpha ignored); None without the classifier."""
    classifier = _classifier()
    if classifier is None:
        return None
    scale = 65535 if pixels.dtype == np.uint16 else 255
    grey_or_rgb = pixels if pixels.ndim == 3 else pixels[..., None]
    colour = grey_or_rgb[..., :3] if grey_or_rgb.shape[2] >= 3 else np.repeat(grey_or_rgb[..., :1], 3, axis=2)
    # a channel at a time: the views resize each channel on its own, and a 24-megapixel photo in
    # float32 would take 290 MB at once
    channels = []
    for channel in range(3):
        plane = colour[..., channel].astype(np.float32)
        plane /= scale
        channels.append([platform_view(torch.from_numpy(plane)[None, None], view) for view in VIEWS])
    views = torch.cat([torch.cat([seen[index] for seen in channels], 1) for index in range(len(VIEWS))])
    return dict(zip(VIEWS, classifier(views).argmax(1).tolist()))


@dataclass(frozen=True)
class SelfCheck:
    """Which views the protection fooled, and the protected image's label on each of those."""

    fooled: dict[str, int]
    views: int = len(VIEWS)

    @property
    def asr(self) -> float:
        return len(self.fooled) / self.views

    def to_params(self) -> dict[str, Any]:
        return {"fooled": dict(sorted(self.fooled.items())), "views": self.views}

    @classmethod
    def from_params(cls, params: Any) -> SelfCheck | None:
        if not isinstance(params, dict) or not isinstance(params.get("fooled"), dict):
            return None
        return cls({str(k): int(v) for k, v in params["fooled"].items()}, int(params.get("views", len(VIEWS))))


def measure(original: np.ndarray, protected: np.ndarray) -> SelfCheck | None:
    clean, adversarial = labels(original), labels(protected)
    if clean is None or adversarial is None:
        return None
    return SelfCheck({view: adversarial[view] for view in VIEWS if adversarial[view] != clean[view]})


def holds(check: SelfCheck, pixels: np.ndarray) -> float | None:
    """The share of all views still fooled by this copy: a view fooled at protect time counts if
    the copy still gets the protected image's label there."""
    now = labels(pixels)
    if now is None:
        return None
    return sum(now[view] == label for view, label in check.fooled.items()) / check.views
