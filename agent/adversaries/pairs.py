"""Training pairs for the attacker's purifiers: batches of (clean, adversarial) images that someone
holding the public code and default weights, but no user's key, can make in any number.

They protect photos of their own with keys of their own (`ProtectedPairs`), attack a classifier
they have themselves (`AttackPairs`), or mix both (`MixedPairs`, as APE-GAN++ trains on several
attack types). Every batch is drawn from a `torch.Generator`, so a purifier's training is
reproducible, and crops are fresh each time, so a small photo set still gives varied batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ..data import ImageSet, PhotoSet, random_crops
from ..rgan.keying import batch_patterns, random_keys
from ..rgan.model import RGAN

# (classifier, clean images, labels) → adversarial images; see `agent.adversaries.attacks`
Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class PairSource(Protocol):
    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, adversarial), both [0, 1] floats of shape (size, 3, crop, crop)."""
        ...


def image_list(data: ImageSet | PhotoSet) -> list[torch.Tensor]:
    return list(data.images)


def _crops(images: list[torch.Tensor], size: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    index = torch.randint(0, len(images), (size,), generator=generator).tolist()
    return random_crops([images[i] for i in index], crop, generator)


@dataclass
class ProtectedPairs:
    """Crops protected by `model`, each with a fresh random key when the model is keyed: the
    attacker's keys, never the users'."""

    model: RGAN
    images: list[torch.Tensor]
    crop: int

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        clean = _crops(self.images, size, self.crop, generator)
        pattern = batch_patterns(random_keys(size, generator), self.crop, self.crop) if self.model.config.keyed else None
        with torch.no_grad():
            return clean, self.model.eval().protect(clean, pattern)


@dataclass
class AttackPairs:
    """Crops attacked on `classifier`. The attacker has no labels for their photos, so the attack
    moves each crop away from the classifier's own prediction."""

    classifier: nn.Module
    images: list[torch.Tensor]
    crop: int
    attack: Attack

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        clean = _crops(self.images, size, self.crop, generator)
        with torch.no_grad():
            labels = self.classifier(clean).argmax(1)
        return clean, self.attack(self.classifier, clean, labels).detach()


@dataclass
class MixedPairs:
    """Each batch from one of `sources`, picked at random."""

    sources: list[PairSource]

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pick = int(torch.randint(0, len(self.sources), (1,), generator=generator))
        return self.sources[pick].batch(size, generator)
