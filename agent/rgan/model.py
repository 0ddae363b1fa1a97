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
from .keying import PATTERN_CHANNELS
from .nets import PerturbationNet
from .reducer import DimensionReducer

MODEL_FORMAT = "rgan-agent/model"
# 2 added the keyed options to the config; version 1 files (unkeyed models) load unchanged
MODEL_FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
# R may have to undo up to half a grey level of rounding on top of the bounded perturbation.
RECOVER_MARGIN = 1 / 255


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Rounds [0, 1] pixels to the 8-bit grid with a straight-through gradient: every real file is
    8-bit, so training sees exactly what a saved image holds while G still gets gradients."""
    x = x.clamp(0, 1)
    return x + (torch.round(x * 255) / 255 - x).detach()


class RGAN(nn.Module):
    """`pattern` is the key's ±1 pattern (`keying.key_pattern`) at the image's size, (3, H, W) or
    one per image (N, 3, H, W); a keyed model needs it and an unkeyed one refuses it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        in_channels = 3 + (PATTERN_CHANNELS if config.keyed else 0)
        self.generator = PerturbationNet(config.width, config.g_depth, in_channels, config.g_stride, config.norm)
        self.reducer = DimensionReducer(config.reducer) if config.reducer.down else nn.Identity()
        self.recoverer = PerturbationNet(config.width, config.r_depth, in_channels, 1, config.norm)

    def _inputs(self, x: torch.Tensor, pattern: torch.Tensor | None) -> torch.Tensor:
        if not self.config.keyed:
            if pattern is not None:
                raise ValueError("this model is not keyed; it takes no key")
            return 2 * x - 1
        return torch.cat([2 * x - 1, self._pattern(x, pattern)], dim=1)

    def _pattern(self, x: torch.Tensor, pattern: torch.Tensor | None) -> torch.Tensor:
        if pattern is None:
            raise ValueError("this model is keyed: protecting and recovering need the key")
        if pattern.dim() == 3:
            pattern = pattern.unsqueeze(0)
        if pattern.shape[-2:] != x.shape[-2:] or pattern.shape[1] != PATTERN_CHANNELS:
            raise ValueError(f"key pattern {tuple(pattern.shape)} does not fit image {tuple(x.shape)}")
        return pattern.to(device=x.device, dtype=x.dtype).expand(len(x), -1, -1, -1)

    def perturbation(self, x: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        """G then DR, bounded in L-infinity through tanh (a smooth, exact bound), plus the key
        pattern's share: the key decides the sign of `key_noise` at every pixel."""
        config = self.config
        raw = self.reducer(self.generator(self._inputs(x, pattern)))
        learned = config.generator_bound * torch.tanh(raw)
        if config.key_noise:
            learned = learned + config.key_noise * self._pattern(x, pattern)
        return learned

    def protect(self, x: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        return quantize(x + self.perturbation(x, pattern))

    def estimate(self, adversarial: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        """R's estimate of what protection added to the image. The key pattern's share is known
        exactly to the key holder; R estimates the rest (G's share, and what clipping at black
        and white took away from the pattern), hence the bound of the whole epsilon."""
        bound = self.config.epsilon + RECOVER_MARGIN
        estimate = bound * torch.tanh(self.recoverer(self._inputs(adversarial, pattern)))
        if self.config.key_noise:
            estimate = estimate + self.config.key_noise * self._pattern(adversarial, pattern)
        return estimate

    def recover(self, adversarial: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        return (adversarial - self.estimate(adversarial, pattern)).clamp(0, 1)


class KeylessRecoverer(nn.Module):
    """R's architecture without the key planes: what someone holding the public code and weights
    but not the key can train to undo a protection. Training pits G against one (so that G makes
    its share depend on the key), and `agent.adversaries.keyless` trains a fresh one to measure
    what a real attacker gets."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.bound = config.epsilon + RECOVER_MARGIN
        self.net = PerturbationNet(config.width, config.r_depth, 3, 1, config.norm)

    def forward(self, adversarial: torch.Tensor) -> torch.Tensor:
        return (adversarial - self.bound * torch.tanh(self.net(2 * adversarial - 1))).clamp(0, 1)


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
    if metadata.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path} has model format version {metadata.get('version')!r}, "
                         f"this agent reads versions {', '.join(READABLE_VERSIONS)}")
    model = RGAN(ModelConfig.from_dict(json.loads(metadata["config"])))
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval(), json.loads(metadata.get("extra", "{}"))
