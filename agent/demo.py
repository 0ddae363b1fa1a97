"""The demo behind the README's first command: a photo (the bundled sample or yours) protected by
the shipped photo model with a fresh random key, recovered with that key, and "recovered" with a
wrong one, written side by side as PNGs with their distortion figures."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .images import read_image, write_image
from .keys import KEY_BYTES
from .pipeline import ProtectOptions, protect, recover, working_copy
from .rgan.model import RGAN

SAMPLE_IMAGE = "sample.png"


def packaged(folder: str, name: str) -> Path:
    return Path(str(resources.files("agent") / folder / name))


def _as_tensor(pixels: np.ndarray) -> torch.Tensor:
    scale = np.iinfo(pixels.dtype).max
    return torch.from_numpy(pixels.astype(np.float32) / scale).permute(2, 0, 1)[None]


def run_demo(out_dir: Path, image_path: Path | None = None, model: RGAN | None = None) -> dict[str, float]:
    """Writes original / protected / recovered / wrong-key PNGs into `out_dir` and returns the
    figures. The key lives only for the demo (a real key comes from the key store)."""
    source = read_image(image_path or packaged("assets", SAMPLE_IMAGE))
    # the demo compares colours only; the pipeline itself keeps alpha and grayscale layouts
    original = working_copy(source[:, :, :3] if source.shape[2] >= 3 else np.repeat(source[:, :, :1], 3, axis=2),
                            ProtectOptions())
    key, wrong_key = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
    protected, info = protect(original, key, model=model)
    recovered = recover(protected, key, info, model=model)
    wrong = recover(protected, wrong_key, info, model=model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {"original": original, "protected": protected, "recovered": recovered, "wrong-key": wrong}
    for name, pixels in images.items():
        write_image(pixels, out_dir / f"{name}.png")
    reference = _as_tensor(original)
    figures = {"width": info.working_size[0], "height": info.working_size[1]}
    for name in ("protected", "recovered", "wrong-key"):
        figures[f"psnr_{name.replace('-', '_')}"] = metrics.psnr(_as_tensor(images[name]), reference).item()
    change = np.abs(protected.astype(np.int64) - original.astype(np.int64)).max()
    figures["max_change_protected"] = float(change * 255 / np.iinfo(original.dtype).max)
    return figures
