"""The key-less recoverer: R's own architecture, trained the way anyone holding the public code and
the default weights could train it. They protect photos of their own with random keys of their own,
which gives them unlimited (original, protected) pairs, and teach the network to undo the
protection without a key. It is then measured on photos protected with keys it never saw.

This is the attack that keyed recovery must withstand (issue 3: its recovered PSNR should stay far
below the key holder's). Unlike the attacker G trains against, this one starts fresh against the
finished model and trains on its own keys for as long as it is given."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..data import ImageSet, PhotoSet, to_float
from ..rgan.keying import batch_patterns, random_keys
from ..rgan.model import RGAN, KeylessRecoverer
from .pairs import ProtectedPairs, image_list


def train_keyless(
    model: RGAN,
    photos: ImageSet | PhotoSet,
    steps: int,
    batch_size: int = 16,
    crop: int = 128,
    lr: float = 1e-3,
    seed: int = 1,
    on_step=None,
) -> tuple[KeylessRecoverer, dict[str, float]]:
    """Trains the attacker for `steps` batches of fresh crops, each protected with fresh keys; the
    seed differs from the model's training seed so the attacker's keys are its own."""
    pairs = ProtectedPairs(model, image_list(photos), crop)
    attacker = KeylessRecoverer(model.config)
    optimizer = torch.optim.Adam(attacker.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    loss = torch.tensor(0.0)
    for step in range(steps):
        clean, adversarial = pairs.batch(batch_size, generator)
        loss = F.mse_loss(attacker(adversarial), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if on_step:
            on_step(step, loss.item())
    return attacker.eval(), {"steps": steps, "seconds": time.perf_counter() - started, "final_mse": loss.item()}


def protect_with_unseen_keys(
    model: RGAN, images: torch.Tensor, seed: int = 12345
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Protects uint8 images with keys from a seed neither the model's training nor the attacker
    used; returns the clean floats, the protected images and the key patterns (None for an
    unkeyed model, which anyone can undo with its own R)."""
    clean = to_float(images)
    pattern = None
    if model.config.keyed:
        pattern = batch_patterns(random_keys(len(clean), torch.Generator().manual_seed(seed)), *clean.shape[-2:])
    with torch.no_grad():
        return clean, model.eval().protect(clean, pattern), pattern
