"""The RGAN as used after training: G (+ DR) protects, R recovers. The sampling path lives here.

The discriminator and the target classifiers only matter while training (see `train.py`), so
they are not part of this module and not shipped with the weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save_file

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

    def learned_perturbation(self, x: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        """G then DR, bounded in L-infinity through tanh (a smooth, exact bound): the share of the
        perturbation that G learned, without the key pattern's share."""
        raw = self.reducer(self.generator(self._inputs(x, pattern)))
        return self.config.generator_bound * torch.tanh(raw)

    def perturbation(self, x: torch.Tensor, pattern: torch.Tensor | None = None,
                     strength: float = 1.0) -> torch.Tensor:
        """G's share scaled by `strength` (1 is what training tuned: stronger attacks, more
        visible), plus the key pattern's share: the key decides the sign of `key_noise` at every
        pixel."""
        learned = strength * self.learned_perturbation(x, pattern)
        if self.config.key_noise:
            learned = learned + self.config.key_noise * self._pattern(x, pattern)
        return learned

    def protect(self, x: torch.Tensor, pattern: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        return quantize(x + self.perturbation(x, pattern, strength))

    def estimate(self, adversarial: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        """R's estimate of what protection added to the image. The key pattern's share is known
        exactly to the key holder; R estimates the rest (G's share, and what clipping at black
        and white took away from the pattern), hence the bound of the whole epsilon."""
        bound = self.config.epsilon + RECOVER_MARGIN
        estimate = bound * torch.tanh(self.recoverer(self._inputs(adversarial, pattern)))
        if self.config.key_noise:
            estimate = estimate + self.config.key_noise * self._pattern(adversarial, pattern)
        return estimate

    def recover(self, adversarial: torch.Tensor, pattern: torch.Tensor | None = None, strength: float = 1.0,
                refine: int = 0) -> torch.Tensor:
        """R's recovery (its estimate of G's share scaled to `strength`), then `refine` steps of
        `refine_step`: the paper's recovery is refine = 0; the agent refines."""
        estimate = self.estimate(adversarial, pattern)
        if strength != 1:
            # only G's share was scaled; the key pattern's is known exactly
            known = self.config.key_noise * self._pattern(adversarial, pattern) if self.config.key_noise else 0
            estimate = known + strength * (estimate - known)
        recovered = (adversarial - estimate).clamp(0, 1)
        for _ in range(refine):
            recovered = self.refine_step(recovered, adversarial, pattern, strength)
        return recovered

    def refine_step(self, recovered: torch.Tensor, adversarial: torch.Tensor, pattern: torch.Tensor | None = None,
                    strength: float = 1.0) -> torch.Tensor:
        """One step of the fixed-point iteration x ← adversarial − perturbation(x): protection is
        deterministic given the image and the key, so the key holder can run G on the current
        estimate of the original and subtract exactly what G would have added to it. G changes
        slowly with its input, so from R's estimate this converges in one or two steps (to what
        clipping and 8-bit rounding left), at any strength. Without the key G's input and the
        pattern are unknown, so this is of no use to an attacker."""
        return (adversarial - self.perturbation(recovered, pattern, strength)).clamp(0, 1)


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


class ModelFileError(ValueError):
    """Bytes that are not a model file this agent can load; the message says why, after the name."""


# a PyTorch file: a zip archive (torch.save since 1.6) or a bare pickle stream (protocol 2+)
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file: its header is an 8-byte little-endian length and
    that much JSON (the safetensors format); the tensors are checked when they are loaded."""
    if len(data) < 8:
        raise ModelFileError("is not a model file (empty or truncated)")
    (length,) = struct.unpack("<Q", data[:8])
    try:
        if length > len(data) - 8:
            raise ValueError("the header runs past the end of the file")
        header = json.loads(data[8:8 + length])
    except ValueError:  # UnicodeDecodeError included
        raise ModelFileError("is not a model file (not safetensors: the agent's model files are safetensors "
                             "with rgan-agent metadata)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def model_from_bytes(data: bytes) -> tuple[RGAN, dict]:
    """A model from the bytes of a file `save_model` wrote, in eval mode on the CPU, and its extra
    info. Model files may come from anyone (users import them), so everything is checked before
    use, and a pickle is refused before anything is parsed: loading one can run any code."""
    if data.startswith(_PICKLE_MAGIC):
        raise ModelFileError("is a PyTorch pickle (.pt/.pth), not a model file: the agent never loads pickles "
                             "(loading one can run any code); it reads only the safetensors model files "
                             "`agent train` writes")
    metadata = _metadata(data)
    if metadata.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"is not an rgan-agent model (a safetensors file of format {metadata.get('format')!r})")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise ModelFileError(f"has model format version {metadata.get('version')!r}; this agent reads versions "
                             f"{', '.join(READABLE_VERSIONS)} (a newer agent wrote it)")
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
        extra = json.loads(metadata.get("extra", "{}"))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"has an unusable model configuration ({error})") from None
    try:
        tensors = load_tensors(data)
    except SafetensorError as error:
        raise ModelFileError(f"is a damaged safetensors file ({error})") from None
    # compared on the meta device first, so that a configuration that does not match the tensors
    # (or asks for enormous networks) is refused before any memory is allocated for it
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in RGAN(config).state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        missing, unknown = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        reshaped = sorted(n for n in expected.keys() & found.keys() if expected[n] != found[n])
        raise ModelFileError(f"does not match its own configuration (missing tensors: {missing[:3]}, unknown: "
                             f"{unknown[:3]}, wrong shape: {reshaped[:3]})")
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise ModelFileError("has NaN or infinite weights")
    model = RGAN(config)
    model.load_state_dict(tensors)
    return model.eval(), extra if isinstance(extra, dict) else {}


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[RGAN, dict]:
    """`model_from_bytes` on a file; a ValueError names the file."""
    try:
        model, extra = model_from_bytes(Path(path).read_bytes())
    except ModelFileError as error:
        raise ModelFileError(f"{path} {error}") from None
    return model.to(device), extra
