"""Training runs and their held-back figures: the CIFAR-10 reproduction (train on the first 8,000
images, measure on the rest) and the photo model (train on 1,100 photos, measure on imagenet-sample's
last 200 as 224×224 centre crops)."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_path
from .classifiers import load_classifier
from .data import TRAIN_SHORT_SIDE, ImageSet, PhotoSet, centre_crops, load_cifar10, load_photos
from .rgan.config import TrainConfig
from .rgan.evaluate import evaluate
from .rgan.model import load_model
from .rgan.train import StepCallback, train

METRICS_NAME = "metrics.json"
DEFAULT_TRANSFER = {"cifar10": ("cifar-resnet56",), "photos": ()}
DEFAULT_TARGET = {"cifar10": "cifar-resnet20", "photos": "imagenet-mobilenetv2"}
# 200 photos at 224×224 in one batch would hold several GB of activations
EVAL_BATCH = {"cifar10": 500, "photos": 50}


def training_data(data: str) -> ImageSet | PhotoSet:
    return load_cifar10("train") if data == "cifar10" else load_photos("train", TRAIN_SHORT_SIDE)


def held_back_data(data: str) -> ImageSet:
    return load_cifar10("test") if data == "cifar10" else centre_crops(load_photos("imagenet-val"))


def train_and_evaluate(
    config: TrainConfig,
    out_dir: Path,
    transfer: tuple[str, ...] | None = None,
    resume: bool = True,
    warm_start: Path | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, float]:
    """Trains (or resumes) a run in `out_dir`, evaluates it and saves the figures as metrics.json.
    `warm_start` and `on_step` as in `rgan.train.train`."""
    targets = [load_classifier(name) for name in config.targets]
    trainer = train(config, training_data(config.data), targets, out_dir, resume=resume, warm_start=warm_start,
                    on_step=on_step)
    transfer = DEFAULT_TRANSFER[config.data] if transfer is None else transfer
    figures = evaluate(
        trainer.model, targets[0], held_back_data(config.data), kappa=config.kappa,
        transfer={name: load_classifier(name) for name in transfer}, device=config.device,
        batch_size=EVAL_BATCH[config.data],
    )
    with atomic_path(Path(out_dir) / METRICS_NAME) as tmp:
        tmp.write_text(json.dumps(figures, indent=2))
    return figures


def evaluate_model_file(
    path: Path, target: str | None = None, transfer: tuple[str, ...] | None = None
) -> dict[str, float]:
    """Figures for a saved model on the held-back images of the data it was trained on."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    model, extra = load_model(path)
    data = extra.get("config", {}).get("data", "cifar10")
    transfer = DEFAULT_TRANSFER[data] if transfer is None else transfer
    return evaluate(model, load_classifier(target or DEFAULT_TARGET[data]), held_back_data(data),
                    transfer={name: load_classifier(name) for name in transfer}, batch_size=EVAL_BATCH[data])
