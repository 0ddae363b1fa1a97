"""The protect → recover demo on a bundled sample photo, with the shipped default model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import metrics
from .atomic import atomic_path
from .rgan.model import load_model, quantize

DEFAULT_MODEL = "cifar10-rgan.safetensors"
SAMPLE_IMAGE = "sample.png"


def packaged(folder: str, name: str) -> Path:
    return Path(str(resources.files("agent") / folder / name))


# the demo runs the whole photo through G and R at once; beyond this the CPU memory grows past
# a few GB (the product's tiled path comes with the photo pipeline)
DEMO_MAX_PIXELS = 4096 * 4096


def read_image(path: Path) -> torch.Tensor:
    """An RGB file as a (1, 3, H, W) tensor on [0, 1]."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > DEMO_MAX_PIXELS:
                raise ValueError(f"{path} has {image.width}×{image.height} pixels; the demo takes "
                                 f"at most {DEMO_MAX_PIXELS:,}")
            array = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image: {path}") from None
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path} is not an image Pillow can read ({error})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255


def write_png(image: torch.Tensor, path: Path) -> None:
    array = (image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


@torch.no_grad()
def run_demo(out_dir: Path, image_path: Path | None = None, model_path: Path | None = None) -> dict[str, float]:
    """Protects the image, recovers it, writes original / protected / recovered PNGs into
    `out_dir` and returns the distortion figures."""
    model, _ = load_model(model_path or packaged("weights", DEFAULT_MODEL))
    original = read_image(image_path or packaged("assets", SAMPLE_IMAGE))
    protected = model.protect(original)
    recovered = quantize(model.recover(protected))
    out_dir = Path(out_dir)
    for name, image in (("original", original), ("protected", protected), ("recovered", recovered)):
        write_png(image, out_dir / f"{name}.png")
    return {
        "width": original.shape[-1],
        "height": original.shape[-2],
        "psnr_protected": metrics.psnr(protected, original).item(),
        "psnr_recovered": metrics.psnr(recovered, original).item(),
        "max_change_protected": (protected - original).abs().max().item() * 255,
    }
