"""The `agent` command: a thin typer shell over library functions (each command calls one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .rgan.config import PHOTO_CONFIG, ModelConfig, ReducerConfig, TrainConfig

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
    out: Path = typer.Option(Path("demo-output"), "-o", "--out", help="folder for the four PNGs"),
    image: Optional[Path] = typer.Option(None, help="a photo of your own instead of the bundled sample"),
) -> None:
    """Protect a photo with a fresh random key, then recover it with that key and with a wrong one;
    writes original / protected / recovered / wrong-key PNGs."""
    from .demo import run_demo

    try:
        figures = run_demo(out, image_path=image)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    print_metrics("protect → recover", figures)
    console.print(f"images written to {out}/")


PRESETS = {"cifar10": TrainConfig(), "photos": PHOTO_CONFIG}


def _option(default_help: str = "", **kwargs):
    """An option whose default comes from the --data preset (None here means "the preset's")."""
    text = f"{default_help} [default: from --data]".strip()
    return typer.Option(None, help=text, **kwargs)


def given(value, preset_value):
    return preset_value if value is None else value


@app.command()
def train(
    data: str = typer.Option("cifar10", help="cifar10 (the paper's reproduction) or photos (the keyed photo model); "
                             "picks the defaults of every other option"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="run folder (checkpoint, model, history) "
                                       "[default: runs/<data>]"),
    epochs: Optional[int] = _option(min=1),
    batch_size: Optional[int] = _option(min=1),
    lr: Optional[float] = _option(min=0.0),
    lr_step: Optional[int] = _option("multiply the learning rate by --lr-gamma every N epochs", min=1),
    lr_gamma: Optional[float] = _option(min=0.0),
    d_lr_scale: Optional[float] = _option("D's learning rate relative to --lr", min=0.0),
    width: Optional[int] = _option("base channel width of G and R", min=1),
    g_depth: Optional[int] = _option("residual blocks in G", min=0),
    r_depth: Optional[int] = _option("residual blocks in R", min=0),
    d_width: Optional[int] = _option("base channel width of D", min=1),
    epsilon: Optional[float] = _option("L-infinity bound, in grey levels out of 255", min=0.0),
    key_noise: Optional[float] = _option("the key pattern's share of the bound, in grey levels", min=0.0),
    down: Optional[str] = _option("DR down-sampling: conv, avg, max, or none (no DR)"),
    up: Optional[str] = _option("DR up-sampling: nearest, unpool, deconv"),
    kernel: Optional[int] = _option("DR kernel and stride", min=2),
    skip: Optional[bool] = typer.Option(None, "--skip/--no-skip", help="DR skip connection [default: from --data]"),
    lambda_dis: Optional[float] = _option("λ1, weight of L_G_dis", min=0.0),
    lambda_mse: Optional[float] = _option("λ2, weight of L_G_mse", min=0.0),
    recover_weight: Optional[float] = _option("weight of R's error in G's loss", min=0.0),
    kappa: Optional[float] = _option("C&W margin confidence of L_G_adv", min=0.0),
    alpha: Optional[float] = _option("weight of L_R_mse in R's loss", min=0.0),
    beta: Optional[float] = _option("weight of L_R_adv in R's loss", min=0.0),
    target: Optional[list[str]] = _option("classifier(s) to fool"),
    transfer: Optional[list[str]] = _option("classifier(s) to measure transfer on"),
    seed: Optional[int] = _option(),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    limit: Optional[int] = typer.Option(None, min=1, help="train on the first N images only"),
    resume: bool = typer.Option(True, help="continue from the run folder's checkpoint"),
) -> None:
    """Train the RGAN jointly, then evaluate it on held-back images: CIFAR-10 (first 8,000 train,
    the other 2,000 evaluate) or photos (1,100 train; imagenet-sample's last 200 evaluate)."""
    from .experiments import train_and_evaluate

    if data not in PRESETS:
        fail(f"--data must be one of {', '.join(PRESETS)}, got {data!r}")
    check_device(device)
    preset = PRESETS[data]
    model, reducer = preset.model, preset.model.reducer
    try:
        config = preset.replace(
            model=ModelConfig(
                width=given(width, model.width), g_depth=given(g_depth, model.g_depth),
                r_depth=given(r_depth, model.r_depth), d_width=given(d_width, model.d_width),
                epsilon=model.epsilon if epsilon is None else epsilon / 255,
                key_noise=model.key_noise if key_noise is None else key_noise / 255,
                keyed=model.keyed, g_stride=model.g_stride, norm=model.norm,
                reducer=ReducerConfig(
                    down=reducer.down if down is None else (None if down == "none" else down),
                    up=given(up, reducer.up), kernel=given(kernel, reducer.kernel), skip=given(skip, reducer.skip),
                ),
            ),
            targets=tuple(target) if target else preset.targets,
            epochs=given(epochs, preset.epochs), batch_size=given(batch_size, preset.batch_size),
            lr=given(lr, preset.lr), lr_step=given(lr_step, preset.lr_step), lr_gamma=given(lr_gamma, preset.lr_gamma),
            d_lr_scale=given(d_lr_scale, preset.d_lr_scale), lambda_dis=given(lambda_dis, preset.lambda_dis),
            lambda_mse=given(lambda_mse, preset.lambda_mse), recover_weight=given(recover_weight, preset.recover_weight),
            kappa=given(kappa, preset.kappa), alpha=given(alpha, preset.alpha), beta=given(beta, preset.beta),
            seed=given(seed, preset.seed), device=device, train_limit=limit,
        )
        out = out or Path("runs") / data
        figures = train_and_evaluate(config, out, transfer=tuple(transfer) if transfer else None, resume=resume)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    print_metrics(f"held-back {data} ({out})", figures)


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="a model.safetensors written by `agent train`"),
    target: Optional[str] = typer.Option(None, help="[default: the one of the model's training data]"),
    transfer: Optional[list[str]] = typer.Option(None, help="[default: the one of the model's training data]"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Evaluate a trained model on the held-back images of the data it was trained on."""
    from .experiments import evaluate_model_file

    try:
        figures = evaluate_model_file(model, target, tuple(transfer) if transfer else None)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    if as_json:
        console.print_json(json.dumps(figures))
    else:
        print_metrics(str(model), figures)


if __name__ == "__main__":
    app()
