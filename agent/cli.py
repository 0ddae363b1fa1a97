"""The `agent` command: a thin typer shell over library functions (each command calls one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .rgan.config import ModelConfig, ReducerConfig, TrainConfig

app = typer.Typer(help="Protect photos with self-recoverable adversarial examples.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def check_device(device: str) -> None:
    """The config validates the name; only here can we say whether this machine has the GPU."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda was asked for, but no CUDA GPU is available here")


def print_metrics(title: str, figures: dict[str, float]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in figures.items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-output"), "-o", "--out", help="folder for the three PNGs"),
    image: Optional[Path] = typer.Option(None, help="a photo of your own instead of the bundled sample"),
) -> None:
    """Protect and then recover a photo with the shipped model; writes original/protected/recovered."""
    from .demo import run_demo

    try:
        figures = run_demo(out, image_path=image)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    print_metrics("protect → recover", figures)
    console.print(f"images written to {out}/")


_TRAIN = TrainConfig()
_MODEL = _TRAIN.model
_REDUCER = _MODEL.reducer


@app.command()
def train(
    out: Path = typer.Option(Path("runs/cifar10"), "-o", "--out", help="run folder (checkpoint, model, history)"),
    epochs: int = typer.Option(_TRAIN.epochs, min=1),
    batch_size: int = typer.Option(_TRAIN.batch_size, min=1),
    lr: float = typer.Option(_TRAIN.lr, min=0.0),
    lr_step: int = typer.Option(_TRAIN.lr_step, min=1, help="multiply the learning rate by --lr-gamma every N epochs"),
    lr_gamma: float = typer.Option(_TRAIN.lr_gamma, min=0.0),
    d_lr_scale: float = typer.Option(_TRAIN.d_lr_scale, min=0.0, help="D's learning rate relative to --lr"),
    width: int = typer.Option(_MODEL.width, min=1, help="base channel width of G and R"),
    g_depth: int = typer.Option(_MODEL.g_depth, min=0, help="residual blocks in G"),
    r_depth: int = typer.Option(_MODEL.r_depth, min=0, help="residual blocks in R"),
    d_width: int = typer.Option(_MODEL.d_width, min=1, help="base channel width of D"),
    epsilon: float = typer.Option(round(_MODEL.epsilon * 255, 6), min=0.0,
                                  help="L-infinity bound, in grey levels out of 255"),
    down: str = typer.Option(_REDUCER.down, help="DR down-sampling: conv, avg, max, or none (no DR)"),
    up: str = typer.Option(_REDUCER.up, help="DR up-sampling: nearest, unpool, deconv"),
    kernel: int = typer.Option(_REDUCER.kernel, min=2, help="DR kernel and stride"),
    skip: bool = typer.Option(_REDUCER.skip, help="DR skip connection"),
    lambda_dis: float = typer.Option(_TRAIN.lambda_dis, min=0.0, help="λ1, weight of L_G_dis"),
    lambda_mse: float = typer.Option(_TRAIN.lambda_mse, min=0.0, help="λ2, weight of L_G_mse"),
    recover_weight: float = typer.Option(_TRAIN.recover_weight, min=0.0, help="weight of R's error in G's loss"),
    kappa: float = typer.Option(_TRAIN.kappa, min=0.0, help="C&W margin confidence of L_G_adv"),
    alpha: float = typer.Option(_TRAIN.alpha, min=0.0, help="weight of L_R_mse in R's loss"),
    beta: float = typer.Option(_TRAIN.beta, min=0.0, help="weight of L_R_adv in R's loss"),
    target: list[str] = typer.Option(list(_TRAIN.targets), help="classifier(s) to fool"),
    transfer: list[str] = typer.Option(["cifar-resnet56"], help="classifier(s) to measure transfer on"),
    seed: int = typer.Option(_TRAIN.seed),
    device: str = typer.Option(_TRAIN.device, help="cpu or cuda"),
    limit: Optional[int] = typer.Option(None, min=1, help="train on the first N images only"),
    resume: bool = typer.Option(True, help="continue from the run folder's checkpoint"),
) -> None:
    """Train the RGAN jointly on CIFAR-10 (first 8,000 images) and evaluate it on the other 2,000."""
    from .experiments import train_and_evaluate

    check_device(device)
    try:
        config = TrainConfig(
            model=ModelConfig(
                width=width, g_depth=g_depth, r_depth=r_depth, d_width=d_width, epsilon=epsilon / 255,
                reducer=ReducerConfig(down=None if down == "none" else down, up=up, kernel=kernel, skip=skip),
            ),
            targets=tuple(target), epochs=epochs, batch_size=batch_size, lr=lr, lr_step=lr_step,
            lr_gamma=lr_gamma, d_lr_scale=d_lr_scale, lambda_dis=lambda_dis, lambda_mse=lambda_mse,
            recover_weight=recover_weight, kappa=kappa, alpha=alpha, beta=beta, seed=seed,
            device=device, train_limit=limit,
        )
        figures = train_and_evaluate(config, out, transfer=tuple(transfer), resume=resume)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    print_metrics(f"held-back CIFAR-10 ({out})", figures)


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="a model.safetensors written by `agent train`"),
    target: str = typer.Option("cifar-resnet20"),
    transfer: list[str] = typer.Option(["cifar-resnet56"]),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Evaluate a trained model on the 2,000 held-back CIFAR-10 images."""
    from .experiments import evaluate_model_file

    try:
        figures = evaluate_model_file(model, target, tuple(transfer))
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    if as_json:
        console.print_json(json.dumps(figures))
    else:
        print_metrics(str(model), figures)


if __name__ == "__main__":
    app()
