"""The RGAN as used after training: G (+ DR) protects, R recovers. The sampling path lives here.

The discriminator and the target classifiers only matter while training (see `train.py`), so
they are not part of this module and not shipped with the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from ..atomic import atomic_path
from .config import ModelConfig
from .nets import PerturbationNet
from .reducer import DimensionReducer

MODEL_FORMAT = "rgan-agent/model"
MODEL_FORMAT_VERSION = "1"
# R may have to undo up to half a grey level of rounding on top of the bounded perturbation.
RECOVER_MARGIN = 1 / 255


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Rounds [0, 1] pixels to the 8-bit grid with a straight-through gradient: every real file is
    8-bit, so training sees exactly what a saved image holds while G still gets gradients."""
    x = x.clamp(0, 1)
    return x + (torch.round(x * 255) / 255 - x).detach()


class RGAN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.generator = PerturbationNet(config.width, config.g_depth)
        self.reducer = DimensionReducer(config.reducer) if config.reducer.down else nn.Identity()
        self.recoverer = PerturbationNet(config.width, config.r_depth)

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """G then DR, bounded in L-infinity by epsilon through tanh (a smooth, exact bound)."""
        return self.config.epsilon * torch.tanh(self.reducer(self.generator(2 * x - 1)))

    def protect(self, x: torch.Tensor) -> torch.Tensor:
        return quantize(x + self.perturbation(x))

    def estimate(self, adversarial: torch.Tensor) -> torch.Tensor:
        """R's estimate of what protection added to the image."""
        bound = self.config.epsilon + RECOVER_MARGIN
        return bound * torch.tanh(self.recoverer(2 * adversarial - 1))

    def recover(self, adversarial: torch.Tensor) -> torch.Tensor:
        return (adversarial - self.estimate(adversarial)).clamp(0, 1)


def save_model(model: RGAN, path: Path, extra: dict | None = None) -> None:
    metadata = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        "extra": json.dumps(extra or {}),
    }
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[RGAN, dict]:
    """Loads weights saved by `save_model`; returns the model (in eval mode) and its extra info."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not an rgan-agent model file")
    if metadata.get("version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{path} has model format version {metadata.get('version')!r}, "
                         f"this agent reads version {MODEL_FORMAT_VERSION}")
    model = RGAN(ModelConfig.from_dict(json.loads(metadata["config"])))
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval(), json.loads(metadata.get("extra", "{}"))
