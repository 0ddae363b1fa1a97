"""The `agent` command: a thin typer shell over library functions (each command calls one)."""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .rgan.config import train_config

app = typer.Typer(help="Protect photos with self-recoverable adversarial examples.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    # escaped (a path may hold [brackets]) and never wrapped: one error, one line
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
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


@contextlib.contextmanager
def training_progress(epochs: int):
    """A progress bar over a training's epochs, drawn from the trainer's `on_step` callback."""
    columns = (TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("{task.fields[losses]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=epochs, epoch=1, losses="")

        def on_step(trainer, step: int, steps: int, means: dict[str, float]) -> None:
            progress.update(task, completed=trainer.epoch + step / steps, epoch=trainer.epoch + 1,
                            losses=" ".join(f"{name}={value:.3f}" for name, value in means.items()))

        yield on_step


def _option(default_help: str = "", **kwargs):
    """An option whose default comes from the --data preset (None here means "the preset's")."""
    text = f"{default_help} [default: from --data]".strip()
    return typer.Option(None, help=text, **kwargs)


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
    warm_start: Optional[Path] = typer.Option(None, help="begin from another run's networks (its folder or "
                                              "checkpoint file), with fresh optimisers and schedule: continue "
                                              "a run under changed options"),
) -> None:
    """Train the RGAN jointly, then evaluate it on held-back images: CIFAR-10 (first 8,000 train,
    the other 2,000 evaluate) or photos (1,100 train; imagenet-sample's last 200 evaluate)."""
    from .experiments import train_and_evaluate

    check_device(device)
    if warm_start is not None and not warm_start.exists():
        fail(f"--warm-start: no run folder or checkpoint at {warm_start}")
    try:
        config = train_config(
            data, epochs=epochs, batch_size=batch_size, lr=lr, lr_step=lr_step, lr_gamma=lr_gamma,
            d_lr_scale=d_lr_scale, width=width, g_depth=g_depth, r_depth=r_depth, d_width=d_width, epsilon=epsilon,
            key_noise=key_noise, down=down, up=up, kernel=kernel, skip=skip, lambda_dis=lambda_dis,
            lambda_mse=lambda_mse, recover_weight=recover_weight, kappa=kappa, alpha=alpha, beta=beta,
            targets=target or None, seed=seed, device=device, train_limit=limit)
        out = out or Path("runs") / data
        with training_progress(config.epochs) as on_step:
            figures = train_and_evaluate(config, out, transfer=tuple(transfer) if transfer else None, resume=resume,
                                         warm_start=warm_start, on_step=on_step)
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



@app.command("eval")
def eval_(
    data: Optional[list[str]] = typer.Option(None, "--data", help="photos and/or cifar10 [default: both]"),
    out: Path = typer.Option(Path("docs/evaluation.md"), "-o", "--out",
                             help="the report; its plots and evaluation.json go to the folder beside it"),
    images: Optional[int] = typer.Option(None, min=1, help="held-back images per data set [default: all]"),
    attack_images: int = typer.Option(50, min=1, help="images Table 3's DDN, PGD and C&W attack"),
    purifier_steps: int = typer.Option(600, min=1, help="training batches per purifier"),
    batch_size: int = typer.Option(16, min=1, help="purifiers' training batch"),
    attack_steps: int = typer.Option(30, min=1, help="iterations of DDN and C&W"),
    projection_steps: int = typer.Option(50, min=1, help="Defense-GAN's gradient steps per restart (L)"),
    restarts: int = typer.Option(4, min=1, help="Defense-GAN's random restarts (R)"),
    photo_model: Optional[Path] = typer.Option(None, help="a photo model file [default: the shipped one]"),
    device: str = typer.Option("cpu", help="cpu or cuda, for training the purifiers"),
    seed: int = typer.Option(0),
) -> None:
    """Attack the protection: platform transforms, the attackers' purifiers (APE-GAN++, Robust
    Recovery, NRP, Defense-GAN, input transforms), transfer and the paper's Table 3; writes a
    report with plots."""
    from .evaluation import EvalOptions, evaluate_and_report

    check_device(device)
    try:
        options = EvalOptions(
            datasets=tuple(data) if data else EvalOptions.datasets, images=images, attack_images=attack_images,
            purifier_steps=purifier_steps, batch_size=batch_size, attack_steps=attack_steps,
            projection_steps=projection_steps, restarts=restarts, photo_model=photo_model, device=device, seed=seed)
        if photo_model is not None and not photo_model.is_file():
            raise FileNotFoundError(f"no such model file: {photo_model}")
        results = evaluate_and_report(options, out, lambda message: err_console.print(message))
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        fail(str(error))
    for name, result in results["datasets"].items():
        goals = result["goals"]
        console.print(f"{name}: ASR after the strongest purifier ({goals['strongest_purifier']}) "
                      f"{goals['asr_after_strongest']:.1%}; best attacker ({goals['best_attacker']}) "
                      f"{goals['best_attacker_psnr']:.2f} dB; owner {goals['owner_psnr']:.2f} dB")
    console.print(f"wrote {out}")

# ---------------------------------------------------------------- the everyday commands
#
# State lives in $AGENT_HOME (default: the platform's data directory, see service.home.agent_home). Exit
# codes: 0 done; 2 bad input of any kind (a missing or unreadable file, a wrong passphrase, an
# unknown user, an unwritable output, a locked log, another agent process), with a one-line
# error; 1 `agent log verify` found the log tampered with.

USER_OPTION_HELP = "whose keys [default: `default`, or the only user]"
PASSPHRASE_FILE_HELP = "read the passphrase from this file [default: $AGENT_PASSPHRASE, else ask in a terminal]"
JSON_HELP = "print JSON instead of a table"


def _home() -> Path:
    from .service.home import agent_home

    return agent_home()


def _call(function, *args, **kwargs):
    """Runs one service function; an error the user can act on becomes a one-line message and exit 2."""
    from .service.home import USER_ERRORS

    try:
        return function(*args, **kwargs)
    except USER_ERRORS as error:
        fail(str(error))


def _ask(what: str, confirm: bool, hint: str) -> str:
    if not sys.stdin.isatty():
        fail(f"no {what}: {hint} (there is no terminal to ask in)")
    value = typer.prompt(what[0].upper() + what[1:], hide_input=True, confirmation_prompt=confirm)
    if not value:
        fail(f"the {what} must not be empty")
    return value


def _passphrase(passphrase_file: Optional[Path], what: str = "passphrase", *, confirm: bool = False,
                recall: bool = False, user: Optional[str] = None) -> str:
    """--passphrase-file, else $AGENT_PASSPHRASE, else (with `recall`, for an existing user's
    passphrase) what `agent keys remember` stored in the OS keyring for `user` (a --user option: None
    is the default user), else a prompt when stdin is a terminal."""
    value = _call(_passphrase_from_env_or_file, passphrase_file)
    if value:
        return value
    if passphrase_file is not None:
        fail(f"the passphrase file {passphrase_file} is empty")
    value = _recalled_passphrase(user) if recall else None
    hint = "set AGENT_PASSPHRASE or pass --passphrase-file FILE" + (", or store it with `agent keys remember`"
                                                                     if recall else "")
    return value or _ask(what, confirm, hint)


def _recalled_passphrase(user: Optional[str]) -> Optional[str]:
    """What the OS keyring holds for `user`; None without a keyring, or for a user that does not
    resolve (the command itself then says what is wrong with it)."""
    from . import keys
    from .service import home

    if keys.keyring_backend() is None:
        return None
    try:
        name = home.resolve_user(_home(), user)
    except home.USER_ERRORS:
        return None
    return _call(keys.recall_passphrase, keys.key_store(_home()), name)


def _passphrase_from_env_or_file(passphrase_file: Optional[Path]) -> Optional[str]:
    from .keys import passphrase_from_env_or_file

    return passphrase_from_env_or_file(passphrase_file)


def _other_secret(path: Optional[Path], what: str, option: str) -> str:
    """A second secret (a new or a backup passphrase): from its own file option, else asked twice."""
    if path is not None:
        from .keys import passphrase_from_env_or_file

        value = _call(passphrase_from_env_or_file, path)
        if not value:
            fail(f"the {what} file {path} is empty")
        return value
    return _ask(what, True, f"pass {option} FILE")


def _echo_json(value) -> None:
    typer.echo(json.dumps(value, indent=2))


@contextlib.contextmanager
def _progress(description: str):
    """A progress bar over the files of a batch, on stderr and only in a terminal."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console, disable=not err_console.is_terminal) as bar:
        task = bar.add_task(description, total=None)

        def on_progress(done: int, total: int, result) -> None:
            bar.update(task, completed=done, total=total,
                       description=f"{description} {result.source.name}" if result is not None else description)

        yield on_progress


def _print_errors(results) -> int:
    failed = [r for r in results if not r.ok]
    for result in failed:
        err_console.print(f"[red]error:[/red] {escape(result.error)}", soft_wrap=True)
    return len(failed)


def _size(size) -> str:
    return "" if size is None else f"{size[0]}×{size[1]}"


@app.command()
def init(
    user: str = typer.Option("default", "--user", "-u", help="name of the first user"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Create the first user's keys and the provenance log in $AGENT_HOME.

    The keys (a 256-bit RGAN key, an Ed25519 signing key, a data key) are encrypted under the
    passphrase."""
    from .service import users

    passphrase = _passphrase(passphrase_file, f"new passphrase for user {user!r}", confirm=True)
    info = _call(users.init_user, _home(), user, passphrase)
    console.print(f"created user [bold]{escape(info['user'])}[/bold] (key {info['active_key_id']}) in "
                  f"{escape(info['home'])}", soft_wrap=True)
    console.print("back the keys up now: `agent keys export FILE` (without them protected photos cannot "
                  "be recovered)", soft_wrap=True)


# ---- users

users_app = typer.Typer(help="Several users on one machine, each with their own keys and log chain.",
                        no_args_is_help=True)
app.add_typer(users_app, name="users")


@users_app.command("list")
def users_list(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """The users with keys here, their active key and how many protections the log holds."""
    from .service import users

    users = _call(users.list_users, _home())
    if as_json:
        _echo_json(users)
        return
    if not users:
        console.print("no users yet: run `agent init`")
        return
    table = Table(title=f"users in {_home()}")
    for column in ("user", "active key", "keys", "created", "records"):
        table.add_column(column)
    for u in users:
        table.add_row(u["user"], u["active_key_id"], str(u["keys"]), u["created"], str(u["records"]))
    console.print(table)


@users_app.command("add")
def users_add(
    name: str = typer.Argument(..., help="1-32 lowercase letters, digits, '-' or '_'"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Add a user with fresh keys."""
    from .service import users

    passphrase = _passphrase(passphrase_file, f"new passphrase for user {name!r}", confirm=True)
    info = _call(users.add_user, _home(), name, passphrase)
    console.print(f"added user [bold]{escape(info['user'])}[/bold] (key {info['active_key_id']})")


@users_app.command("remove")
def users_remove(
    name: str = typer.Argument(...),
    yes: bool = typer.Option(False, "--yes", help="do not ask for confirmation"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Delete a user's keys.

    What they protected can then no longer be recovered (export a backup first). Their records
    stay in the log."""
    from .service import users

    if not yes:
        if not sys.stdin.isatty():
            fail(f"removing user {name!r} deletes their keys; pass --yes to confirm")
        typer.confirm(f"Delete the keys of user {name!r}? Photos they protected cannot be recovered without "
                      "a backup", abort=True)
    passphrase = _passphrase(passphrase_file, f"passphrase of user {name!r}", recall=True, user=name)
    _call(users.remove_user, _home(), name, passphrase)
    console.print(f"removed the keys of user {escape(name)}")


# ---- keys

keys_app = typer.Typer(help="A user's keys: show, back up, restore, rotate, change the passphrase, keep it "
                       "in the OS keyring.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("show")
def keys_show(
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """The public parts: key ids and dates, the signing public key (no passphrase needed)."""
    from .service import users

    info = _call(users.show_keys, _home(), user)
    if as_json:
        _echo_json(info)
        if info["warning"]:
            raise typer.Exit(2)
        return
    table = Table(title=f"keys of {info['user']} ({info['records']} records)")
    table.add_column("RGAN key id")
    table.add_column("created")
    table.add_column("")
    for key in info["rgan_keys"]:
        table.add_row(key["id"], key["created"], "active" if key["id"] == info["active_key_id"] else "")
    console.print(table)
    console.print(f"signing public key (Ed25519): {info['signing_public_key']}", soft_wrap=True)
    console.print(f"key file: {escape(info['file'])} (scrypt n={info['kdf']['n']})", soft_wrap=True)
    if info["warning"]:
        fail(info["warning"])


@keys_app.command("export")
def keys_export(
    dst: Path = typer.Argument(..., help="the backup file to write (never overwritten)"),
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    backup_passphrase_file: Optional[Path] = typer.Option(None, "--backup-passphrase-file",
                                                          help="the backup's passphrase [default: ask]"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Write an encrypted backup of a user's keys, under a passphrase of its own."""
    from .service import users

    passphrase = _passphrase(passphrase_file, recall=True, user=user)
    backup = _other_secret(backup_passphrase_file, "backup passphrase", "--backup-passphrase-file")
    info = _call(users.export_keys, _home(), user, passphrase, dst, backup)
    console.print(f"wrote the keys of {escape(info['user'])} to {escape(str(dst))}", soft_wrap=True)


@keys_app.command("import")
def keys_import(
    src: Path = typer.Argument(..., help="a backup written by `agent keys export`"),
    as_user: Optional[str] = typer.Option(None, "--as", help="import under this user name [default: the backup's]"),
    replace: bool = typer.Option(False, "--replace", help="replace the keys of an existing user of that name"),
    backup_passphrase_file: Optional[Path] = typer.Option(None, "--backup-passphrase-file",
                                                          help="the backup's passphrase [default: ask]"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file",
                                                   help="read the passphrase the keys get here from this file "
                                                   "[default: $AGENT_PASSPHRASE, else ask in a terminal]"),
) -> None:
    """Restore a backup into this machine's key store."""
    from .service import users

    backup = _other_secret(backup_passphrase_file, "backup passphrase", "--backup-passphrase-file")
    passphrase = _passphrase(passphrase_file, "new passphrase for the imported keys", confirm=True)
    info = _call(users.import_keys, _home(), src, backup, passphrase, as_user, replace=replace)
    console.print(f"imported user [bold]{escape(info['user'])}[/bold] ({len(info['rgan_keys'])} RGAN keys)")


@keys_app.command("rotate")
def keys_rotate(
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Make a fresh RGAN key the active one; older keys stay, so older photos still recover."""
    from .service import users

    passphrase = _passphrase(passphrase_file, recall=True, user=user)
    info = _call(users.rotate_key, _home(), user, passphrase)
    console.print(f"user {escape(info['user'])}: new active key {info['active_key_id']} "
                  f"({len(info['rgan_keys'])} keys kept)")


@keys_app.command("change-passphrase")
def keys_change_passphrase(
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    new_passphrase_file: Optional[Path] = typer.Option(None, "--new-passphrase-file",
                                                       help="read the new passphrase from this file [default: ask]"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Re-encrypt a user's keys under a new passphrase."""
    from .service import users

    old = _passphrase(passphrase_file, "current passphrase", recall=True, user=user)
    new = _other_secret(new_passphrase_file, "new passphrase", "--new-passphrase-file")
    info = _call(users.change_passphrase, _home(), user, old, new)
    console.print(f"changed the passphrase of user {escape(info['user'])}")


@keys_app.command("remember")
def keys_remember(
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Store a user's passphrase in the OS keyring, so that commands unlock without asking.

    The passphrase is checked against the key file first. $AGENT_PASSPHRASE and --passphrase-file
    still win over the keyring; `agent keys forget` removes it."""
    from . import keys
    from .service import home

    passphrase = _passphrase(passphrase_file)
    name = _call(home.resolve_user, _home(), user)
    _call(keys.remember_passphrase, keys.key_store(_home()), name, passphrase)
    console.print(f"the OS keyring now holds the passphrase of user {escape(name)}")


@keys_app.command("forget")
def keys_forget(user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP)) -> None:
    """Remove a user's passphrase from the OS keyring (also for a user whose keys are gone)."""
    from . import keys
    from .service import home

    # a removed user no longer resolves, but may still have a passphrase stored
    name = _call(keys.check_user, user) if user is not None else _call(home.resolve_user, _home(), None)
    if _call(keys.forget_passphrase, keys.key_store(_home()), name):
        console.print(f"removed the passphrase of user {escape(name)} from the OS keyring")
    else:
        console.print(f"the OS keyring held no passphrase of user {escape(name)}")


# ---- models

models_app = typer.Typer(help="A user's models: the shipped default or their own, encrypted at rest with their "
                         "data key.", no_args_is_help=True)
app.add_typer(models_app, name="models")

MODEL_ARGUMENT_HELP = "a model's name, the start of its SHA-256, or `default` (the shipped model)"


@models_app.command("list")
def models_list(
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """The shipped model and the user's own; the active one protects new photos (no passphrase needed)."""
    from .service import models

    listing = _call(models.list_models, _home(), user)
    if as_json:
        _echo_json(listing)
        return
    table = Table(title="models")
    for column in ("", "name", "SHA-256", "created", "size", "report"):
        table.add_column(column, overflow="fold")
    for model in listing:
        size = "[red]file missing[/red]" if model["size"] is None else f"{model['size'] / 1024:.0f} KiB"
        table.add_row("active" if model["active"] else "", escape(model["name"]), model["sha256"][:12],
                      model["created"] or "", size, escape(model["summary"]))
    console.print(table)


@models_app.command("use")
def models_use(
    name: str = typer.Argument(..., help=MODEL_ARGUMENT_HELP),
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
) -> None:
    """Protect new photos with this model; photos protected before still recover with theirs."""
    from .service import models

    info = _call(models.use_model, _home(), user, name)
    console.print(f"user {escape(info['user'])} now protects with model {escape(info['name'])} "
                  f"({info['sha256'][:16]})", soft_wrap=True)


@models_app.command("export")
def models_export(
    name: str = typer.Argument(..., help=MODEL_ARGUMENT_HELP),
    dst: Path = typer.Argument(..., help="the model file (safetensors) to write"),
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing file"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Write a model decrypted, as the safetensors file it was imported from."""
    from .service import models

    passphrase = _passphrase(passphrase_file, recall=True, user=user)
    info = _call(models.export_model, _home(), user, passphrase, name, dst, overwrite=overwrite)
    console.print(f"wrote model {escape(info['name'])} ({info['sha256'][:16]}) to {escape(info['file'])}",
                  soft_wrap=True)


@models_app.command("import")
def models_import(
    src: Path = typer.Argument(..., help="a model file (safetensors) from `agent train` or `agent models export`"),
    name: Optional[str] = typer.Option(None, "--name", help="what to call it [default: the file's name]"),
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Add a model of your own, stored encrypted with your data key; `agent models use` activates it.

    Only keyed rgan-agent model files in safetensors are accepted, never pickles (.pt, .pth)."""
    from .service import models

    passphrase = _passphrase(passphrase_file, recall=True, user=user)
    info = _call(models.import_model, _home(), user, passphrase, src, name)
    if info["imported"]:
        console.print(f"imported model {escape(info['name'])} ({info['sha256'][:16]}); protect with it after "
                      f"`agent models use {escape(info['name'])}`", soft_wrap=True)
    else:
        console.print(f"already imported as model {escape(info['name'])} ({info['sha256'][:16]})", soft_wrap=True)


# ---- protect, recover, check

@app.command()
def protect(
    paths: list[Path] = typer.Argument(..., help="photos (.jpg .jpeg .png .webp .heic) and folders, searched "
                                       "recursively", show_default=False),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="folder for the outputs [default: beside each photo]"),
    max_side: int = typer.Option(2048, "--max-side", min=0, help="longest side of the working resolution; larger "
                                 "photos are downscaled first (0: keep the full size)"),
    strength: str = typer.Option("medium", "--strength", help="low, medium or high: stronger fools more "
                                 "classifiers and is more visible; recovery works at each"),
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing outputs (an original never is)"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Protect photos and folders of photos, logging a signed record of each.

    Writes <name>.protected.<ext> in the same format (EXIF orientation applied, GPS and serial
    numbers removed, capture date and colour profile kept). Exits 2 if any file failed; the
    others are still done."""
    from .pipeline import STRENGTHS, ProtectOptions
    from .service.protect import protect_paths

    if strength not in STRENGTHS:
        fail(f"--strength must be one of {', '.join(STRENGTHS)}, got {strength!r}")
    try:
        options = ProtectOptions(max_side=max_side or None, strength=strength)
    except ValueError as error:
        fail(f"--max-side: {error}")
    passphrase = _passphrase(passphrase_file, recall=True, user=user)
    with _progress("protecting") as on_progress:
        results = _call(protect_paths, _home(), user, passphrase, paths, out, options,
                        overwrite=overwrite, on_progress=on_progress)
    if as_json:
        _echo_json([r.to_dict() for r in results])
    elif any(r.ok for r in results):
        table = Table(title="protected")
        for column in ("photo", "output", "size", "PSNR dB", "record"):
            table.add_column(column, overflow="fold")
        for r in results:
            if r.ok:
                table.add_row(str(r.source), str(r.output), _size(r.working_size),
                              "" if r.psnr is None else f"{r.psnr:.1f}", r.record_id[:12])
        console.print(table)
        skipped = [r for r in results if r.ok and r.skipped]
        if skipped:
            console.print(f"{len(skipped)} skipped: an earlier run had protected them (their records are in the log)",
                          soft_wrap=True)
    if _print_errors(results):
        raise typer.Exit(2)


@app.command()
def recover(
    images: list[Path] = typer.Argument(..., help="protected photos (or folders of them)", show_default=False),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="folder for the outputs [default: beside each photo]"),
    user: Optional[str] = typer.Option(None, "--user", "-u", help="this user's photos: one whose record is "
                                       "another user's is refused"),
    force: bool = typer.Option(False, "--force", help="with --user, recover a photo that has no record with the "
                               "user's active key (right only if that key protected it)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing outputs"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Recover protected photos into <name>.recovered.png.

    Finds each one's record (exact hash, else perceptual hash, so a platform's recompressed copy
    is found too) and uses the key of the user who protected it."""
    from .service.recover import recover_paths

    passphrase = _passphrase(passphrase_file, recall=True, user=user)
    with _progress("recovering") as on_progress:
        results = _call(recover_paths, _home(), images, out, passphrase, user, overwrite=overwrite,
                        force=force, on_progress=on_progress)
    if as_json:
        _echo_json([r.to_dict() for r in results])
    elif any(r.ok for r in results):
        table = Table(title="recovered")
        for column in ("photo", "output", "user", "found by", "record"):
            table.add_column(column, overflow="fold")
        for r in results:
            if r.ok:
                table.add_row(str(r.source), str(r.output), r.user, r.matched_by, (r.record_id or "")[:12])
        console.print(table)
        for r in results:
            if r.ok and r.note:
                console.print(f"note: {escape(r.source.name)}: {escape(r.note)}", soft_wrap=True)
    if _print_errors(results):
        raise typer.Exit(2)


@app.command()
def check(
    image: Path = typer.Argument(...),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Is this photo protected, by whom and when (from the log)?"""
    from .service import log

    result = _call(log.check_image, _home(), image)
    if as_json:
        _echo_json(result.to_dict())
        if result.authentic is False:
            raise typer.Exit(2)
        return
    record = result.record or result.original_of
    if result.authentic is False:
        fail(f"{image}: record {record.id} does not verify ({result.problem}): what it says about this photo "
             "cannot be trusted; run `agent log verify`")
    if result.protected:
        how = "exactly" if result.matched_by == "sha256" else f"as a look-alike ({result.distance} bits)"
        console.print(f"[green]protected[/green] by user [bold]{escape(record.user)}[/bold] on {record.time} "
                      f"(record {record.id}, #{record.seq}, found {how})", soft_wrap=True)
    elif record is not None:
        console.print(f"[yellow]not protected[/yellow]: the original of record {record.id} (user "
                      f"{escape(record.user)}, {record.time})", soft_wrap=True)
    else:
        console.print("[yellow]not protected[/yellow]: no record of this photo in the log")
    if result.authentic is not None:
        console.print("the record verifies" if result.authentic else "[red]the record does not verify[/red]")
    if result.protected and result.record.self_check_asr is not None:
        now = "" if result.self_check_asr is None else f"; this copy: {result.self_check_asr:.0%}"
        console.print(f"self-check, platform views fooled: {result.record.self_check_asr:.0%} when protected{now}",
                      soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {escape(note)}", soft_wrap=True)


# ---- the log

log_app = typer.Typer(help="The provenance log: `agent log` lists, `agent log verify` checks the chains.",
                      invoke_without_command=True)
app.add_typer(log_app, name="log")


def _since(text: Optional[str]) -> Optional[datetime]:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--since {text!r} is not an ISO date or time (e.g. 2025-01-31 or 2025-01-31T18:00Z)")
    return moment if moment.tzinfo is not None else moment.astimezone()  # local time when none is given


@log_app.callback()
def log(
    ctx: typer.Context,
    since: Optional[str] = typer.Option(None, "--since", help="only records at or after this ISO date/time "
                                        "(local time unless it says otherwise)"),
    user: Optional[str] = typer.Option(None, "--user", "-u", help="only this user's records"),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help="to show the file names: read "
                                                   "the passphrase from this file [default: $AGENT_PASSPHRASE]"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List the protections in the log.

    File names are shown when the passphrase is given by --passphrase-file or $AGENT_PASSPHRASE."""
    if ctx.invoked_subcommand is not None:
        return
    from .service import log

    moment = _since(since)
    passphrase = _call(_passphrase_from_env_or_file, passphrase_file)
    listing = _call(log.log_records, _home(), passphrase, user=user, since=moment)
    if as_json:
        _echo_json(listing.to_dict())
        return
    table = Table(title=f"{len(listing.records)} protections")
    for column in ("time", "user", "#", "file", "size", "PSNR dB", "record"):
        table.add_column(column, overflow="fold")
    table.add_column("signed", no_wrap=True)
    unverified = listing.unverified
    for r in listing.records:
        name = r.file_name if r.decrypted else "(encrypted)"
        table.add_row(r.time[:19].replace("T", " "), r.user, str(r.seq), name or "", _size(r.working_size),
                      "" if r.psnr is None else f"{r.psnr:.1f}", r.id[:12],
                      f"[red]{unverified[r.id].kind.upper()}[/red]" if r.id in unverified else "ok")
    console.print(table)
    for problem in listing.problems:
        err_console.print(f"[red]warning:[/red] {escape(str(problem))}", soft_wrap=True)
    if listing.problems:
        err_console.print("what these records say cannot be trusted; `agent log verify` checks the whole log",
                          soft_wrap=True)
    if listing.locked:
        console.print(f"file names of {', '.join(listing.locked)} stay encrypted: give their passphrase with "
                      "--passphrase-file or AGENT_PASSPHRASE", soft_wrap=True)
    for record_id in listing.undecryptable:
        err_console.print(f"[red]warning:[/red] record {record_id}: the file name does not decrypt; "
                          "run `agent log verify`", soft_wrap=True)


@log_app.command("verify")
def log_verify(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Check every record's hash and signature and every chain link.

    Names each altered, inserted or removed record and exits 1 if there is any."""
    from .service import log

    report = _call(log.verify_log, _home())
    if as_json:
        _echo_json(report.to_dict())
    else:
        for line in str(report).splitlines():
            console.print(escape(line), soft_wrap=True, style=None if report.ok else "red")
    if not report.ok:
        raise typer.Exit(1)



# ---- the local service for the browser extension, and pairing it

@app.command()
def serve(
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535,
                                       help="the loopback port [default: $AGENT_PORT, else 47830]"),
    host_check: Optional[list[str]] = typer.Option(None, "--host-check", metavar="NAME",
                                                   help="also accept this name in the Host header: a loopback "
                                                   "alias from /etc/hosts (127.0.0.1, localhost and [::1] always "
                                                   "are); repeatable"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="photos protected at once "
                                          "[default: --micro-batch]"),
    queue: int = typer.Option(4, "--queue", min=0, help="photos that may wait for a worker; more get 503 and "
                              "Retry-After"),
    device: str = typer.Option("cpu", help="cpu or cuda: where the networks run"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", min=1, help="photos that may share one "
                                              "forward pass [default: 8 on cuda, 1 on cpu]"),
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Serve the browser extension on 127.0.0.1 and ::1 until Ctrl-C or SIGTERM.

    The user's keys are unlocked once, now, and held only in this process's memory. Pair the
    extension with `agent pair`. One JSON log line per request goes to stderr."""
    import logging

    from . import server

    check_device(device)
    micro_batch = micro_batch or (8 if device.startswith("cuda") else 1)
    try:
        options = server.ServerOptions(workers=workers or micro_batch, queue=queue, hosts=tuple(host_check or ()),
                                       device=device, micro_batch=micro_batch)
    except ValueError as error:
        fail(str(error))
    from .service import users
    from .service.home import DEFAULT_USER

    home = _home()
    if not _call(users.list_users, home):
        # a fresh machine: the README's one command sets up and serves, as `agent init` would
        user = user or DEFAULT_USER
        err_console.print(f"no keys in {home} yet: creating user {user!r} (as `agent init` does)", soft_wrap=True)
        passphrase = _passphrase(passphrase_file, f"new passphrase for user {user!r}", confirm=True)
        _call(users.init_user, home, user, passphrase)
        err_console.print("back the keys up: `agent keys export FILE` (without them protected photos cannot be "
                          "recovered)", soft_wrap=True)
    else:
        passphrase = _passphrase(passphrase_file, recall=True, user=user)
    # the service's own lines (one per request) and other libraries' warnings, not their chatter
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger(server.log.name).setLevel(logging.INFO)

    def on_ready(urls: list[str]) -> None:
        err_console.print(f"agent serving on {', '.join(urls)}; pair the extension with `agent pair`", soft_wrap=True)

    _call(server.serve, home, user, passphrase, port=port, options=options, on_ready=on_ready)


@app.command()
def pair(
    list_tokens: bool = typer.Option(False, "--list", help="list the paired extensions instead"),
    revoke: Optional[str] = typer.Option(None, "--revoke", metavar="ID", help="revoke the token with this id "
                                         "(from --list); at once, also for a running `agent serve`"),
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Print a one-time code that pairs the browser extension with `agent serve`.

    Type it into the extension's options within 5 minutes. The extension then holds a token,
    which `--list` shows and `--revoke ID` cancels. Making a code needs the passphrase."""
    from .service import pairing

    if list_tokens and revoke is not None:
        fail("--list and --revoke do one thing each; pass one of them")
    if list_tokens:
        tokens = _call(pairing.tokens_of, _home(), user)
        if as_json:
            _echo_json([t.to_dict() for t in tokens])
            return
        if not tokens:
            console.print("no extension is paired: run `agent pair` and type the code into the extension")
            return
        table = Table(title="paired extensions")
        for column in ("id", "user", "extension", "label", "paired", "last used", "revoked"):
            table.add_column(column, overflow="fold")
        for t in tokens:
            table.add_row(t.id, t.user, t.origin or "", t.label or "", t.created[:19].replace("T", " "),
                          (t.last_used or "")[:19].replace("T", " "), (t.revoked or "")[:19].replace("T", " "))
        console.print(table)
        return
    if revoke is not None:
        info = _call(pairing.revoke, _home(), revoke)
        if as_json:
            _echo_json(info.to_dict())
        else:
            console.print(f"revoked token {info.id} ({escape(info.origin or 'no origin')}, user {escape(info.user)})",
                          soft_wrap=True)
        return
    passphrase = _passphrase(passphrase_file, recall=True, user=user)
    code = _call(pairing.create_code_for, _home(), user, passphrase)
    if as_json:
        _echo_json({"code": code.code, "user": code.user, "expires": code.expires})
        return
    console.print(f"pairing code for user [bold]{escape(code.user)}[/bold]: [bold]{code.code}[/bold]")
    console.print(f"type it into the extension's options; it works once, until {code.expires[:19].replace('T', ' ')} "
                  "UTC", soft_wrap=True)


# ---- fine-tuning in the background: jobs and the worker

@models_app.command("finetune")
def models_finetune(
    images: list[Path] = typer.Option(..., "--images", help="a folder of your photos (JPEG, PNG), searched "
                                      "recursively; repeatable", show_default=False),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="[default: 3 on the CPU, 20 on CUDA]"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="processes training data-parallel (torchrun): GPUs with "
                              "cuda, CPU processes with cpu"),
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Queue a job that adapts the default model to your photos; `agent worker` runs it.

    One photo in ten is held out: the new model becomes active only if, on those, it fools
    MobileNetV2 and keeps quality at least as well as the default; otherwise it is kept inactive
    with its report (`agent jobs show ID`)."""
    from .service import jobs

    job = _call(jobs.submit_finetune, _home(), user, images, epochs=epochs, device=device, nproc=nproc)
    if as_json:
        _echo_json(job)
        return
    typer.echo(job["id"])
    params = job["params"]
    err_console.print(f"queued job {job['id']} for user {escape(job['user'])}: {params['epochs']} epochs on "
                      f"{params['device']} ({params['nproc']} process{'es' if params['nproc'] > 1 else ''}); "
                      "run `agent worker` to start it, `agent jobs show ID` to follow it", soft_wrap=True)


jobs_app = typer.Typer(help="Background jobs (fine-tuning): list, show, cancel.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def _job_status(job: dict) -> str:
    progress = job["progress"] or {}
    if job["state"] != "running":
        return ""
    if progress.get("phase") != "training":
        return progress.get("phase", "starting")
    eta = progress.get("eta_seconds")
    text = f"epoch {progress['epoch']}/{progress['epochs']}, step {progress['step']}/{progress['steps']}"
    return text + (f", ETA {eta / 60:.1f} min" if eta is not None else "")


@jobs_app.command("list")
def jobs_list(
    user: Optional[str] = typer.Option(None, "--user", "-u", help="only this user's jobs [default: everyone's]"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Every job, newest first, with its state and progress."""
    from .service import jobs

    listing = _call(jobs.list_jobs, _home(), user)
    if as_json:
        _echo_json(listing)
        return
    if not listing:
        console.print("no jobs: `agent models finetune --images DIR` queues one")
        return
    table = Table(title="jobs")
    for column in ("id", "user", "state", "created", "progress", "result"):
        table.add_column(column, overflow="fold")
    for job in listing:
        result = job["result"] or {}
        outcome = f"{result['model']} ({'active' if result['active'] else 'inactive'})" if result else \
            (job["error"] or "")
        table.add_row(str(job["id"]), escape(job["user"]), job["state"], job["created"], _job_status(job),
                      escape(outcome))
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: int = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """One job: its parameters, progress (epoch, losses, ETA) and result or error."""
    from .service import jobs

    job = _call(jobs.show_job, _home(), job_id)
    if as_json:
        _echo_json(job)
        return
    console.print(f"job {job['id']} of user [bold]{escape(job['user'])}[/bold]: [bold]{job['state']}[/bold] "
                  f"(created {job['created']}, started {job['started'] or '-'}, finished {job['finished'] or '-'})",
                  soft_wrap=True)
    params = job["params"]
    console.print(f"photos in {escape(', '.join(params['images']))}; {params['epochs']} epochs on {params['device']} "
                  f"x{params['nproc']}, {params['crop']}-px crops, batch {params['batch_size']}", soft_wrap=True)
    progress = job["progress"] or {}
    if _job_status(job):
        console.print(_job_status(job))
    if progress.get("losses"):
        console.print("losses: " + " ".join(f"{name}={value:.3f}" for name, value in progress["losses"].items()),
                      soft_wrap=True)
    if job["error"]:
        err_console.print(f"[red]error:[/red] {escape(job['error'])}", soft_wrap=True)
    result = job["result"]
    if result:
        report = result["report"]
        table = Table(title=f"held-out photos ({report['holdout_photos']})")
        for column in ("", "ASR", "PSNR protected", "PSNR recovered", "PSNR wrong key"):
            table.add_column(column, justify="right")
        for label, figures in (("default", report["default"]), (escape(result["model"]), report["finetuned"])):
            table.add_row(label, f"{100 * figures['asr']:.1f}%", f"{figures['psnr_adv']:.2f} dB",
                          f"{figures['psnr_rec']:.2f} dB", f"{figures['psnr_rec_wrong_key']:.2f} dB")
        console.print(table)
        if result["active"]:
            console.print(f"model {escape(result['model'])} is now active", soft_wrap=True)
        else:
            console.print(f"model {escape(result['model'])} was stored inactive: "
                          f"{escape('; '.join(report['reasons']))}", soft_wrap=True)


@jobs_app.command("cancel")
def jobs_cancel(job_id: int = typer.Argument(..., metavar="ID")) -> None:
    """Cancel a queued job, or a running one at its next training step."""
    from .service import jobs

    job = _call(jobs.cancel_job, _home(), job_id)
    console.print(f"cancelled job {job['id']}")


@app.command()
def worker(
    once: bool = typer.Option(False, "--once", help="run at most one job, then exit"),
    user: Optional[str] = typer.Option(None, "--user", "-u", help=USER_OPTION_HELP),
    passphrase_file: Optional[Path] = typer.Option(None, "--passphrase-file", help=PASSPHRASE_FILE_HELP),
) -> None:
    """Run the user's queued jobs one at a time until Ctrl-C or SIGTERM.

    The passphrase is asked once, now: results are stored encrypted with the user's data key. A
    stop leaves the running job's checkpoint and puts it back in the queue; the next worker
    resumes it."""
    from .service import jobs

    passphrase = _passphrase(passphrase_file, recall=True, user=user)

    def on_event(message: str) -> None:
        err_console.print(message, soft_wrap=True)

    _call(jobs.run_worker, _home(), user, passphrase, once=once, on_event=on_event)


if __name__ == "__main__":
    app()
