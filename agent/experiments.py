"""The CIFAR-10 reproduction's experiment: train on the first 8,000 images, measure on the rest."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_path
from .classifiers import load_classifier
from .data import load_cifar10
from .rgan.config import TrainConfig
from .rgan.evaluate import evaluate
from .rgan.model import load_model
from .rgan.train import train

METRICS_NAME = "metrics.json"


def train_and_evaluate(
    config: TrainConfig,
    out_dir: Path,
    transfer: tuple[str, ...] = ("cifar-resnet56",),
    resume: bool = True,
    show_progress: bool = True,
) -> dict[str, float]:
    """Trains (or resumes) a run in `out_dir`, evaluates it and saves the figures as metrics.json."""
    targets = [load_classifier(name) for name in config.targets]
    trainer = train(config, load_cifar10("train"), targets, out_dir, resume=resume, show_progress=show_progress)
    figures = evaluate(
        trainer.model, targets[0], load_cifar10("test"), kappa=config.kappa,
        transfer={name: load_classifier(name) for name in transfer}, device=config.device,
    )
    with atomic_path(Path(out_dir) / METRICS_NAME) as tmp:
        tmp.write_text(json.dumps(figures, indent=2))
    return figures


def evaluate_model_file(path: Path, target: str, transfer: tuple[str, ...] = ()) -> dict[str, float]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    model, _ = load_model(path)
    return evaluate(model, load_classifier(target), load_cifar10("test"),
                    transfer={name: load_classifier(name) for name in transfer})
