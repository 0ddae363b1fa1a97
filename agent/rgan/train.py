"""The joint training loop (paper §3.3, §4): G, DR, R and D learn together, one batch at a time.

Each step does three updates on the same batch (four for a keyed model with a key-less attacker):
1. D learns to tell clean images from protected ones (L_D, eq. 14).
2. G (with DR) minimises L_G = L_G_adv + λ1·L_G_dis + λ2·L_G_mse + γ·L_R_mse. The last term is
   the recoverability signal: R's error on the protected image is back-propagated *through R*
   into G, so G learns perturbations that R can undo (R's weights are not moved by this term).
3. R minimises α·L_R_mse + β·L_R_adv on the protected batch (paper Table 2).
4. The key-less attacker A minimises its recovery error L_A_mse without the key, while G's loss
   above subtracts keyless_weight·L_A_mse: G is pushed to make what it adds depend on the key, so
   that only R, which has the key, can undo it.
The target classifiers C stay frozen throughout.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..atomic import atomic_path
from ..data import ImageSet, PhotoSet, augment, random_crops, to_float
from . import losses
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .keying import batch_patterns, random_keys
from .model import RGAN, KeylessRecoverer, save_model
from .nets import Discriminator
from .transforms import downscale, jpeg, straight_through

CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_NAME = "model.safetensors"
HISTORY_NAME = "history.json"


@dataclass
class Trainer:
    config: TrainConfig
    model: RGAN
    discriminator: Discriminator
    targets: list[nn.Module]
    # the key-less recoverer G trains against (only with keyless_weight > 0)
    attacker: KeylessRecoverer | None
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.StepLR]
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    def modules(self) -> dict[str, nn.Module]:
        modules = {"rgan": self.model, "discriminator": self.discriminator}
        if self.attacker is not None:
            modules["attacker"] = self.attacker
        return modules


def build_trainer(config: TrainConfig, targets: list[nn.Module]) -> Trainer:
    if not targets:
        raise ValueError("training needs at least one target classifier")
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model = RGAN(config.model).to(device)
    discriminator = Discriminator(config.model.d_width).to(device)
    generator_params = list(model.generator.parameters()) + list(model.reducer.parameters())
    optimizers = {
        "generator": torch.optim.Adam(generator_params, lr=config.lr),
        "recoverer": torch.optim.Adam(model.recoverer.parameters(), lr=config.lr),
        "discriminator": torch.optim.Adam(discriminator.parameters(), lr=config.lr * config.d_lr_scale),
    }
    attacker = None
    if config.keyless_weight:
        attacker = KeylessRecoverer(config.model).to(device)
        optimizers["attacker"] = torch.optim.Adam(attacker.parameters(), lr=config.lr)
    schedulers = {
        name: torch.optim.lr_scheduler.StepLR(opt, step_size=config.lr_step, gamma=config.lr_gamma)
        for name, opt in optimizers.items()
    }
    targets = [t.to(device).eval() for t in targets]
    return Trainer(config, model, discriminator, targets, attacker, optimizers, schedulers)


def _autocast(trainer: Trainer):
    if trainer.device.type == "cuda" and trainer.config.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@dataclass(frozen=True)
class Channel:
    """What one batch's protected images go through before C and R see them (see transforms)."""

    scale: float = 1.0
    jpeg_quality: list[int] | None = None

    @classmethod
    def draw(cls, config: TrainConfig, count: int, generator: torch.Generator) -> "Channel":
        # draws only for the transforms that are on, so that runs without them keep their batches
        scale, quality = 1.0, None
        if config.resize_min < 1:
            scale = config.resize_min + (1 - config.resize_min) * float(torch.rand(1, generator=generator))
        if config.jpeg_prob and torch.rand(1, generator=generator) < config.jpeg_prob:
            low, high = config.jpeg_quality
            quality = torch.randint(low, high + 1, (count,), generator=generator).tolist()
        return cls(scale, quality)


def train_step(
    trainer: Trainer,
    clean: torch.Tensor,
    pattern: torch.Tensor | None = None,
    channel: Channel = Channel(),
) -> dict[str, float]:
    config, model, disc = trainer.config, trainer.model, trainer.discriminator
    eps = config.model.epsilon
    with torch.no_grad(), _autocast(trainer):
        labels = [target(downscale(clean, channel.scale)).argmax(1) for target in trainer.targets]

    with _autocast(trainer):
        adversarial = model.protect(clean, pattern)
        loss_d = losses.discriminator(disc(clean), disc(adversarial.detach()))
    _step(trainer.optimizers["discriminator"], loss_d.float())

    # the copy a platform keeps: recompressed (the codec is not differentiable, so C's gradient
    # passes straight through it), then downscaled before its classifier looks
    received = adversarial
    if channel.jpeg_quality:
        received = straight_through(adversarial, jpeg(adversarial, channel.jpeg_quality))
    with _autocast(trainer):
        seen = downscale(received, channel.scale)
        g_adv = torch.stack([
            losses.cw_margin(target(seen).float(), y, config.kappa)
            for target, y in zip(trainer.targets, labels)
        ]).mean()
        g_dis = losses.generator_dis(disc(adversarial).float())
        g_mse = losses.distortion(adversarial.float(), clean, eps)
        g_rec = losses.distortion(model.recover(adversarial, pattern).float(), clean, eps)
        loss_g = g_adv + config.lambda_dis * g_dis + config.lambda_mse * g_mse + config.recover_weight * g_rec
        if trainer.attacker is not None:
            loss_g = loss_g - config.keyless_weight * losses.distortion(trainer.attacker(adversarial).float(), clean, eps)
    _step(trainer.optimizers["generator"], loss_g)

    with _autocast(trainer):
        recovered = model.recover(received.detach(), pattern)
        r_mse = losses.distortion(recovered.float(), clean, eps)
        # always measured; back-propagated only when trained (β > 0)
        with torch.set_grad_enabled(config.beta > 0):
            r_adv = torch.stack([
                losses.recover_adv(target(downscale(recovered, channel.scale)).float(), y)
                for target, y in zip(trainer.targets, labels)
            ]).mean()
        loss_r = config.alpha * r_mse + config.beta * r_adv
    _step(trainer.optimizers["recoverer"], loss_r)

    values = {"L_D": loss_d, "L_G_adv": g_adv, "L_G_dis": g_dis, "L_G_mse": g_mse,
              "L_R_mse": r_mse, "L_R_adv": r_adv}
    if trainer.attacker is not None:
        with _autocast(trainer):
            values["L_A_mse"] = losses.distortion(trainer.attacker(received.detach()).float(), clean, eps)
        _step(trainer.optimizers["attacker"], values["L_A_mse"])
    return {name: value.item() for name, value in values.items()}


def _batch(config: TrainConfig, data: ImageSet | PhotoSet, index: torch.Tensor,
           generator: torch.Generator) -> torch.Tensor:
    if isinstance(data, PhotoSet):
        return random_crops([data.images[i] for i in index.tolist()], config.crop, generator)
    return augment(to_float(data.images[index]), generator)


def train_epoch(trainer: Trainer, data: ImageSet | PhotoSet, on_step=None) -> dict[str, float]:
    """One pass over `data` in an order drawn from (seed, epoch), so a resumed run repeats it.
    A keyed model gets a fresh random key for every image of every batch."""
    config = trainer.config
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed * 100_003 + trainer.epoch)
    order = torch.randperm(len(data), generator=generator)
    trainer.model.train()
    trainer.discriminator.train()
    totals: dict[str, float] = {}
    steps = math.ceil(len(data) / config.batch_size)
    for step in range(steps):
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        batch = _batch(config, data, index, generator)
        pattern = None
        if config.model.keyed:
            pattern = batch_patterns(random_keys(len(batch), generator), *batch.shape[-2:]).to(trainer.device)
        channel = Channel.draw(config, len(batch), generator)
        values = train_step(trainer, batch.to(trainer.device), pattern, channel)
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value
        if on_step:
            on_step({name: total / (step + 1) for name, total in totals.items()})
    for scheduler in trainer.schedulers.values():
        scheduler.step()
    trainer.epoch += 1
    means = {name: total / steps for name, total in totals.items()}
    trainer.history.append({"epoch": trainer.epoch, **means, "seconds": time.perf_counter() - started})
    return means


def save_trainer(trainer: Trainer, out_dir: Path) -> None:
    save_checkpoint(
        out_dir / CHECKPOINT_NAME, trainer.modules(), trainer.optimizers, trainer.schedulers,
        {"epoch": trainer.epoch, "history": trainer.history, "config": trainer.config.to_dict()},
    )


def resume_trainer(trainer: Trainer, out_dir: Path) -> bool:
    """Loads `out_dir`'s checkpoint into `trainer` if there is one; refuses a different config."""
    path = out_dir / CHECKPOINT_NAME
    if not path.exists():
        return False
    state = load_checkpoint(path, trainer.modules(), trainer.optimizers, trainer.schedulers)
    saved = TrainConfig.from_dict(state["config"])
    if _resumable(saved) != _resumable(trainer.config):
        raise ValueError(f"{path} was trained with a different configuration; "
                         "use another output folder or the same options")
    trainer.epoch, trainer.history = state["epoch"], state["history"]
    return True


def _resumable(config: TrainConfig) -> TrainConfig:
    # the epoch count, device and precision may change between runs of one training
    return config.replace(epochs=1, device="cpu", amp=False)


def train(
    config: TrainConfig,
    data: ImageSet | PhotoSet,
    targets: list[nn.Module],
    out_dir: Path,
    resume: bool = True,
    show_progress: bool = True,
) -> Trainer:
    """Trains until `config.epochs`, checkpointing after every epoch, then writes the model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, targets)
    if resume:
        resume_trainer(trainer, out_dir)
    data = data.subset(config.train_limit)
    columns = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.fields[losses]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task("train", total=config.epochs, completed=trainer.epoch,
                                 epoch=trainer.epoch, losses="")

        def show(means: dict[str, float]) -> None:
            text = " ".join(f"{name}={value:.3f}" for name, value in means.items())
            progress.update(task, losses=text)

        while trainer.epoch < config.epochs:
            progress.update(task, epoch=trainer.epoch + 1)
            train_epoch(trainer, data, on_step=show)
            save_trainer(trainer, out_dir)
            progress.update(task, completed=trainer.epoch)
    save_model(trainer.model, out_dir / MODEL_NAME, extra={"config": config.to_dict(), "epochs": trainer.epoch})
    with atomic_path(out_dir / HISTORY_NAME) as tmp:
        tmp.write_text(json.dumps(trainer.history, indent=2))
    return trainer
