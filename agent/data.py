"""Training and evaluation data: where `../shared` is, and the CIFAR-10 split of the reproduction.

Images are held as uint8 tensors (N, 3, H, W) and turned into [0, 1] floats per batch, which keeps
the 10,000 CIFAR images in 30 MB and decoding out of the training loop.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CIFAR_ZIP = Path("data") / "cifar10" / "cifar10-test-jpeg.zip"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The reproduction protocol: the first 8,000 test images (sorted paths) train, the rest evaluate.
CIFAR_TRAIN_COUNT = 8000


def shared_dir() -> Path:
    """The development data folder: $RGAN_SHARED, else `shared/` beside the repository."""
    env = os.environ.get("RGAN_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared"


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,), -1 where unknown

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, count: int | None) -> "ImageSet":
        return self if count is None else ImageSet(self.images[:count], self.labels[:count])


def _decode(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_cifar10(split: str, zip_path: Path | None = None) -> ImageSet:
    """`split` is "train" (first 8,000 sorted paths) or "test" (the other 2,000)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    zip_path = Path(zip_path) if zip_path else shared_dir() / CIFAR_ZIP
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
        names = names[:CIFAR_TRAIN_COUNT] if split == "train" else names[CIFAR_TRAIN_COUNT:]
        images = torch.stack([_decode(archive.read(name)) for name in names])
    labels = torch.tensor([CIFAR_CLASSES.index(Path(name).parent.name) for name in names])
    return ImageSet(images, labels)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after reflect padding, and horizontal flips, drawn from `generator` so that a
    resumed run sees the same batches as an uninterrupted one."""
    n, _, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    crops = torch.stack([padded[i, :, y : y + height, x : x + width]
                         for i, (y, x) in enumerate(zip(dy.tolist(), dx.tolist()))])
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)
