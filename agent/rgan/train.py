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

Data parallel (torch.distributed, e.g. under `torchrun`): when a process group is up, every process
draws the same global batch from the (seed, epoch) generator and trains on its share of it (the
rows `DistributedSampler` gives its rank), through the same networks wrapped in
`DistributedDataParallel`, which averages the gradients. The global batch, and therefore the
losses and the weights, are those of a single process up to floating-point summation order (with
batch norm, only on CUDA, where it becomes SyncBatchNorm). Rank 0 alone writes checkpoints, the
model and the history.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

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
    # data parallelism: this process's rank among `world` processes, and the networks train_step
    # runs (the same modules, behind DistributedDataParallel; see `_replicate`)
    rank: int = 0
    world: int = 1
    replicas: "Replicas | None" = None

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
    trainer = Trainer(config, model, discriminator, targets, attacker, optimizers, schedulers)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        trainer.rank, trainer.world = dist.get_rank(), dist.get_world_size()
        trainer.replicas = _replicate(trainer)
    return trainer


@dataclass(frozen=True)
class Replicas:
    model: RGAN
    discriminator: nn.Module
    attacker: nn.Module | None


def _replicate(trainer: Trainer) -> Replicas:
    """The trainer's networks behind DistributedDataParallel. The RGAN is a shallow copy whose G, DR
    and R are the wrapped modules, so `protect` / `recover` run through the wrappers' gradient
    hooks while `trainer.model` keeps the plain modules (the same parameters): checkpoints and
    model files are exactly what a single process writes."""
    device = trainer.device
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None

    def wrap(module: nn.Module) -> nn.Module:
        if not any(p.requires_grad for p in module.parameters()):
            return module  # e.g. an average-pool DR: nothing to synchronise, and DDP refuses it
        if device.type == "cuda":
            # per-process batch statistics would make the result depend on the number of
            # processes; CPU (gloo) has no SyncBatchNorm
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=ids)

    model = copy.copy(trainer.model)
    model._modules = {name: wrap(module) for name, module in trainer.model._modules.items()}
    return Replicas(model, wrap(trainer.discriminator),
                    None if trainer.attacker is None else wrap(trainer.attacker))


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

    def rows(self, rows: list[int]) -> "Channel":
        """This channel for the given rows of its batch (a process's share of a global batch)."""
        return Channel(self.scale, None if self.jpeg_quality is None else [self.jpeg_quality[i] for i in rows])


def train_step(
    trainer: Trainer,
    clean: torch.Tensor,
    pattern: torch.Tensor | None = None,
    channel: Channel = Channel(),
) -> dict[str, float]:
    config, eps = trainer.config, trainer.config.model.epsilon
    nets = trainer.replicas or trainer
    model, disc, attacker = nets.model, nets.discriminator, nets.attacker
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
        if attacker is not None:
            loss_g = loss_g - config.keyless_weight * losses.distortion(attacker(adversarial).float(), clean, eps)
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
    if attacker is not None:
        with _autocast(trainer):
            values["L_A_mse"] = losses.distortion(attacker(received.detach()).float(), clean, eps)
        _step(trainer.optimizers["attacker"], values["L_A_mse"])
    return {name: value.item() for name, value in values.items()}


def _batch(config: TrainConfig, data: ImageSet | PhotoSet, index: torch.Tensor,
           generator: torch.Generator) -> torch.Tensor:
    if isinstance(data, PhotoSet):
        return random_crops([data.images[i] for i in index.tolist()], config.crop, generator)
    return augment(to_float(data.images[index]), generator)


# on_step(trainer, step, steps, means): how a caller follows training (the CLI draws its bar)
StepCallback = Callable[["Trainer", int, int, dict[str, float]], None]


class TrainingStopped(Exception):
    """`stop` asked for it between two steps: the epoch was not finished, and nothing was saved for
    it (the last checkpoint resumes the run, which then repeats the same batches)."""


def _shard(trainer: Trainer, count: int) -> list[int]:
    # padded by repetition when `count` does not divide: every process must run every step
    return list(DistributedSampler(range(count), num_replicas=trainer.world, rank=trainer.rank, shuffle=False))


def _all_processes(trainer: Trainer, values: list[float]) -> list[float]:
    """The sums of `values` over the processes (themselves in a single process)."""
    if trainer.world == 1:
        return values
    device = trainer.device if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def train_epoch(trainer: Trainer, data: ImageSet | PhotoSet, on_step=None,
                stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """One pass over `data` in an order drawn from (seed, epoch), so a resumed run repeats it.
    A keyed model gets a fresh random key for every image of every batch. `on_step(step, steps,
    means)` follows the running means (over all processes); `stop()`, asked before every step
    (and true for all processes once it is for one), ends the epoch early with `TrainingStopped`."""
    config = trainer.config
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed * 100_003 + trainer.epoch)
    order = torch.randperm(len(data), generator=generator)
    trainer.model.train()
    trainer.discriminator.train()
    totals: dict[str, float] = {}
    steps = math.ceil(len(data) / config.batch_size)
    for step in range(steps):
        if stop is not None and _all_processes(trainer, [float(stop())])[0]:
            raise TrainingStopped(f"stopped in epoch {trainer.epoch + 1} before step {step + 1} of {steps}")
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        # every process draws the whole global batch, so that the generator stays the same
        # everywhere, and keeps its share
        batch = _batch(config, data, index, generator)
        keys = random_keys(len(batch), generator) if config.model.keyed else None
        channel = Channel.draw(config, len(batch), generator)
        if trainer.world > 1:
            rows = _shard(trainer, len(batch))
            batch, channel = batch[rows], channel.rows(rows)
            keys = None if keys is None else [keys[i] for i in rows]
        pattern = None if keys is None else batch_patterns(keys, *batch.shape[-2:]).to(trainer.device)
        values = train_step(trainer, batch.to(trainer.device), pattern, channel)
        means = _all_processes(trainer, list(values.values()))
        for name, value in zip(values, means):
            totals[name] = totals.get(name, 0.0) + value / trainer.world
        if on_step:
            on_step(step + 1, steps, {name: total / (step + 1) for name, total in totals.items()})
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


def load_networks(trainer: Trainer, path: Path) -> None:
    """Only the networks of a checkpoint (a run folder's, or the file itself) into `trainer`."""
    path = path / CHECKPOINT_NAME if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        load_checkpoint(path, trainer.modules(), {}, {})
    except RuntimeError as error:  # load_state_dict's complaint about missing or misshapen weights
        raise ValueError(f"{path} holds networks of another shape than these options make "
                         f"({str(error).splitlines()[0]})") from None


def _resumable(config: TrainConfig) -> TrainConfig:
    # the epoch count, device and precision may change between runs of one training
    return config.replace(epochs=1, device="cpu", amp=False)


def train(
    config: TrainConfig,
    data: ImageSet | PhotoSet,
    targets: list[nn.Module],
    out_dir: Path,
    resume: bool = True,
    *,
    start: RGAN | None = None,
    warm_start: Path | None = None,
    on_step: StepCallback | None = None,
    stop: Callable[[], bool] | None = None,
) -> Trainer:
    """Trains until `config.epochs`, checkpointing after every epoch, then writes the model.
    `start`: weights to begin from (fine-tuning; a checkpoint in `out_dir` still wins).
    `warm_start`: another run's folder or checkpoint, whose networks (D included) to begin from
    with fresh optimisers, schedule and epoch count: a run continued under changed options, e.g.
    a larger margin; a checkpoint in `out_dir` still wins. `on_step(
    trainer, step, steps, means)` and `stop` as in `train_epoch`; a stop raises `TrainingStopped`
    with the last epoch's checkpoint in place. Rank 0 alone writes (see the module's docstring)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(config, targets)
    writer = trainer.rank == 0
    if start is not None:
        trainer.model.load_state_dict(start.state_dict())
    if warm_start is not None:
        load_networks(trainer, Path(warm_start))
    if resume:
        resume_trainer(trainer, out_dir)
    data = data.subset(config.train_limit)
    while trainer.epoch < config.epochs:
        train_epoch(trainer, data, stop=stop,
                    on_step=None if on_step is None else functools.partial(on_step, trainer))
        if writer:
            save_trainer(trainer, out_dir)
    if writer:
        save_model(trainer.model, out_dir / MODEL_NAME, extra={"config": config.to_dict(), "epochs": trainer.epoch})
        with atomic_path(out_dir / HISTORY_NAME) as tmp:
            tmp.write_text(json.dumps(trainer.history, indent=2))
    return trainer
