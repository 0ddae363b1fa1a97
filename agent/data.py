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


# Real photos (../shared/data/photos): imagenet-sample's first 800 (sorted) and bsds500's train and
# val folders train; imagenet-sample's last 200 and bsds500 test are held back.
PHOTOS = Path("data") / "photos"
IMAGENET_TRAIN_COUNT = 800
PHOTO_SPLITS = ("train", "imagenet-val", "bsds-test")
# Training photos are kept with this shorter side: the size a platform's classifier looks at
# (256 before its 224 crop), and 1,100 of them fit in 300 MB.
TRAIN_SHORT_SIDE = 256


@dataclass(frozen=True)
class PhotoSet:
    """Photos of different sizes, each a uint8 (3, H, W) tensor."""

    images: list[torch.Tensor]
    labels: torch.Tensor  # ImageNet class index, -1 where unknown
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, count: int | None) -> "PhotoSet":
        if count is None:
            return self
        return PhotoSet(self.images[:count], self.labels[:count], self.names[:count])


def photo_paths(split: str, root: Path | None = None) -> list[Path]:
    root = Path(root) if root else shared_dir() / PHOTOS
    imagenet = sorted((root / "imagenet-sample").glob("*.JPEG"))
    if split == "train":
        bsds = sorted((root / "bsds500" / "train").glob("*.jpg")) + sorted((root / "bsds500" / "val").glob("*.jpg"))
        paths = imagenet[:IMAGENET_TRAIN_COUNT] + bsds
    elif split == "imagenet-val":
        paths = imagenet[IMAGENET_TRAIN_COUNT:]
    elif split == "bsds-test":
        paths = sorted((root / "bsds500" / "test").glob("*.jpg"))
    else:
        raise ValueError(f"photo split must be one of {', '.join(PHOTO_SPLITS)}, got {split!r}")
    if not paths:
        raise FileNotFoundError(f"no photos for split {split!r} under {root}")
    return paths


def imagenet_label(path: Path, synsets: list[str]) -> int:
    synset = Path(path).name.split("_", 1)[0]
    return synsets.index(synset) if synset in synsets else -1


def read_photo(path: Path, short_side: int | None = None) -> torch.Tensor:
    """An RGB uint8 (3, H, W) tensor, optionally downscaled (never upscaled) to `short_side`."""
    from PIL import ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        if short_side and min(image.size) > short_side:
            ratio = short_side / min(image.size)
            image = image.resize((round(image.width * ratio), round(image.height * ratio)), Image.LANCZOS)
        array = np.asarray(image)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_photos(split: str, short_side: int | None = None, root: Path | None = None) -> PhotoSet:
    paths = photo_paths(split, root)
    synsets_file = (Path(root) if root else shared_dir() / PHOTOS) / "imagenet-synsets.txt"
    synsets = synsets_file.read_text().split() if synsets_file.exists() else []
    images = [read_photo(path, short_side) for path in paths]
    labels = torch.tensor([imagenet_label(path, synsets) for path in paths])
    return PhotoSet(images, labels, [path.name for path in paths])


def random_crops(images: list[torch.Tensor], crop: int, generator: torch.Generator) -> torch.Tensor:
    """One square crop of side `crop` per image, [0, 1] floats: a random side between `crop` and
    the image's shorter side (scale jitter), resized to `crop`, at a random place, flipped half the
    time. Drawn from `generator` so that a resumed run sees the same batches."""
    out = []
    for image in images:
        height, width = image.shape[-2:]
        short = min(height, width)
        side = crop if short <= crop else int(torch.randint(crop, short + 1, (1,), generator=generator))
        top = int(torch.randint(0, max(height - side, 0) + 1, (1,), generator=generator))
        left = int(torch.randint(0, max(width - side, 0) + 1, (1,), generator=generator))
        patch = to_float(image[:, top : top + side, left : left + side]).unsqueeze(0)
        if patch.shape[-2:] != (crop, crop):
            patch = F.interpolate(patch, size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)
        if torch.rand(1, generator=generator) < 0.5:
            patch = patch.flip(-1)
        out.append(patch[0])
    return torch.stack(out)


def centre_crops(photos: PhotoSet, short: int = 256, side: int = 224) -> ImageSet:
    """The paper's (and torchvision's) evaluation protocol: shorter side to 256, centre 224×224."""
    from .rgan.transforms import centre_crop, resize_short_side

    crops = [centre_crop(resize_short_side(to_float(image).unsqueeze(0), short), side)[0] for image in photos.images]
    images = (torch.stack(crops) * 255).round().byte()
    return ImageSet(images, photos.labels)
