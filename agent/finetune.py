"""Fine-tuning the photo model on one user's photos, and the quality gate its result must pass.

A run starts from the shipped default model (`agent/weights/photo-rgan.safetensors`) and continues
the joint loop of `rgan/train.py` on the user's photos with the photo preset's losses: G, DR and R
adapt, a fresh discriminator and key-less attacker train alongside as in any run. Its folder (a
job's work folder, `agent/service/jobs.py`) holds:

    spec.json              what to train on: the parameters, and the training / held-out photos,
                           fixed at the first start so that a resumed run sees the same split
    checkpoint.safetensors the joint state after the last finished epoch (`rgan/train.py`)
    model.safetensors      written by rank 0 once the last epoch is done
    progress.json          rank 0's progress, when the run is a `torchrun` of several processes
    stop                   asks those processes to stop before their next step

The held-out photos (10%, at least one, chosen by the SHA-256 of each file's bytes: the same
photos every time, wherever the folder is) are never trained on. On them, as 224×224 centre
crops, both the default and the new model are measured with the same keys: ASR against
MobileNetV2, adversarial PSNR, recovered PSNR with the key and with a wrong key. `gate` accepts
the new model only if its ASR, adversarial PSNR and recovered PSNR are each at least the default's
and a wrong key still recovers nothing (at most 1 dB above the protected image).

`python -m agent.finetune WORKDIR` is one process of a data-parallel run (under `torchrun`; see
`rgan/train.py`): NCCL on CUDA (one GPU per process, `LOCAL_RANK`), gloo on the CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import write_text
from .classifiers import load_classifier
from .data import TRAIN_SHORT_SIDE, PhotoSet, centre_crops, read_photo
from .rgan.config import PHOTO_CONFIG, TrainConfig
from .rgan.evaluate import evaluate
from .rgan.model import RGAN, load_model
from .rgan.train import MODEL_NAME, TrainingStopped, Trainer, train

PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
HOLDOUT_FRACTION = 0.1
# fewer photos than this cannot both train and leave a held-out set worth measuring
MIN_PHOTOS = 10
# the shipped model ended its schedule at 1e-4; fine-tuning continues there rather than undoing it
FINETUNE_LR = 1e-4
# how long a run is by default where it runs: the CPU gets a few short epochs on small crops
DEFAULTS = {"cpu": {"epochs": 3, "crop": 64, "batch_size": 8}, "cuda": {"epochs": 20, "crop": 128, "batch_size": 16}}
TARGET = "imagenet-mobilenetv2"
EVAL_BATCH = 50
# both models are measured with the same per-image keys
KEY_SEED = 20_251
# what "a wrong key recovers nothing" allows: its PSNR at most this far above the protected image's
WRONG_KEY_MARGIN_DB = 1.0
GATED = ("asr", "psnr_adv", "psnr_rec")
SPEC_NAME = "spec.json"
PROGRESS_NAME = "progress.json"
STOP_NAME = "stop"


class FinetuneError(ValueError):
    """A fine-tuning input the user can fix (folders, photos, options); the message says which."""


@dataclass(frozen=True)
class FinetuneParams:
    images: tuple[str, ...]  # folders of photos, absolute
    epochs: int
    device: str  # cpu or cuda
    nproc: int
    crop: int
    batch_size: int
    seed: int = 0

    @classmethod
    def make(cls, images, *, epochs: int | None = None, device: str = "cpu", nproc: int = 1,
             crop: int | None = None, batch_size: int | None = None, seed: int = 0) -> "FinetuneParams":
        """Checked parameters, with the device's defaults for what is not given."""
        if device not in DEFAULTS:
            raise FinetuneError(f"--device must be cpu or cuda, got {device!r}")
        defaults = DEFAULTS[device]
        params = cls(tuple(str(Path(folder).resolve()) for folder in images),
                     defaults["epochs"] if epochs is None else epochs, device, nproc,
                     defaults["crop"] if crop is None else crop,
                     defaults["batch_size"] if batch_size is None else batch_size, seed)
        if not params.images:
            raise FinetuneError("no photo folders given: pass --images DIR")
        for name in ("epochs", "nproc", "batch_size"):
            if not isinstance(getattr(params, name), int) or getattr(params, name) < 1:
                raise FinetuneError(f"{name} must be a whole number of at least 1, got {getattr(params, name)!r}")
        if params.crop < 16:
            raise FinetuneError(f"crop must be at least 16 pixels, got {params.crop}")
        if params.batch_size < params.nproc:
            raise FinetuneError(f"a batch of {params.batch_size} cannot be shared by {params.nproc} processes")
        return params

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "images": list(self.images)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneParams":
        return cls.make(data["images"], epochs=data["epochs"], device=data["device"], nproc=data["nproc"],
                        crop=data["crop"], batch_size=data["batch_size"], seed=data.get("seed", 0))


def check_device(params: FinetuneParams) -> None:
    """What only this machine can say: is there a GPU, and enough of them."""
    if params.device == "cuda":
        if not torch.cuda.is_available():
            raise FinetuneError("--device cuda was asked for, but no CUDA GPU is available here")
        if params.nproc > torch.cuda.device_count():
            raise FinetuneError(f"--nproc {params.nproc} needs as many GPUs; this machine has "
                                f"{torch.cuda.device_count()}")


# ---------------------------------------------------------------- the photos

def photo_files(folders) -> list[Path]:
    """Every JPEG and PNG under the folders (recursively, hidden files and folders skipped), sorted."""
    found: set[Path] = set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FinetuneError(f"{folder}: no such folder" if not folder.exists() else
                                f"{folder} is a file; --images takes folders of photos")
        for path in folder.rglob("*"):
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if not hidden and path.suffix.lower() in PHOTO_SUFFIXES and path.is_file():
                found.add(path.resolve())
    if len(found) < MIN_PHOTOS:
        where = ", ".join(str(folder) for folder in folders)
        raise FinetuneError(f"{where}: {len(found)} JPEG or PNG photos; fine-tuning needs at least {MIN_PHOTOS} "
                            f"(one in ten is held out to check the result)")
    return sorted(found)


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise FinetuneError(f"cannot read {path}: {error.strerror}") from None


def split(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training, held-out): the held-out tenth are the photos whose contents hash lowest."""
    ranked = sorted(paths, key=lambda path: (_sha256(path), str(path)))
    count = max(1, round(HOLDOUT_FRACTION * len(paths)))
    holdout = set(ranked[:count])
    return [p for p in paths if p not in holdout], [p for p in paths if p in holdout]


def load_photos(paths) -> PhotoSet:
    images = []
    for path in map(Path, paths):
        try:
            images.append(read_photo(path, TRAIN_SHORT_SIDE))
        except FileNotFoundError:
            raise FinetuneError(f"{path} is gone since the job started; put it back or submit a new job") from None
        except (OSError, ValueError) as error:  # PIL.UnidentifiedImageError is an OSError
            raise FinetuneError(f"{path} is not a readable photo ({error})") from None
    return PhotoSet(images, torch.full((len(images),), -1), [Path(p).name for p in paths])


def prepare(workdir: Path, params: FinetuneParams) -> dict[str, Any]:
    """The run's spec: written at the first start (the split, fixed), read back on a resume."""
    path = Path(workdir) / SPEC_NAME
    if path.exists():
        return json.loads(path.read_text())
    training, holdout = split(photo_files(params.images))
    spec = {"params": params.to_dict(), "train": [str(p) for p in training], "holdout": [str(p) for p in holdout]}
    write_text(path, json.dumps(spec, indent=2))
    return spec


# ---------------------------------------------------------------- training

def default_model() -> RGAN:
    from .pipeline import DEFAULT_MODEL_PATH

    return load_model(DEFAULT_MODEL_PATH)[0]


def finetune_config(params: FinetuneParams, model: RGAN, device: str) -> TrainConfig:
    """The photo preset's losses and channel on the default model's networks, at a fine-tuning
    learning rate held constant (the step falls after the last epoch)."""
    return PHOTO_CONFIG.replace(model=model.config, epochs=params.epochs, batch_size=params.batch_size,
                                crop=params.crop, lr=FINETUNE_LR, lr_step=params.epochs, seed=params.seed,
                                device=device)


class Progress:
    """Turns the loop's per-step callback into the progress a job reports: epoch, step, running
    losses, images per second and an ETA. Both are timed from the end of this run's first step,
    so that loading (and a resumed run's earlier epochs) do not count; None until then."""

    def __init__(self, params: FinetuneParams):
        self.params = params
        self.started: float | None = None
        self.first = 0  # the global step at which timing started

    def step(self, trainer: Trainer, step: int, steps: int, means: dict[str, float]) -> dict[str, Any]:
        done = trainer.epoch * steps + step
        if self.started is None:
            self.started, self.first = time.monotonic(), done
        ran, elapsed = done - self.first, time.monotonic() - self.started
        pace = elapsed / ran if ran else None
        return {"phase": "training", "epoch": trainer.epoch + 1, "epochs": self.params.epochs, "step": step,
                "steps": steps, "losses": {name: round(value, 5) for name, value in means.items()},
                "images_per_second": None if pace is None else round(self.params.batch_size / pace, 3),
                "eta_seconds": None if pace is None else round((self.params.epochs * steps - done) * pace, 1)}


def train_run(workdir: Path, params: FinetuneParams, *, device: str | None = None, on_progress=None,
              stop=None) -> Trainer:
    """Trains (or resumes) the run in `workdir` until its last epoch; rank 0 writes the model.
    `on_progress(dict)` gets `Progress` reports; `stop()` between steps raises `TrainingStopped`."""
    spec = prepare(workdir, params)
    start = default_model()
    config = finetune_config(params, start, device or params.device)
    progress = Progress(params)

    def on_step(trainer: Trainer, step: int, steps: int, means: dict[str, float]) -> None:
        if on_progress is not None:
            on_progress(progress.step(trainer, step, steps, means))

    return train(config, load_photos(spec["train"]), [load_classifier(name) for name in config.targets],
                 Path(workdir), start=start, on_step=on_step, stop=stop)


# ---------------------------------------------------------------- the quality gate

def measure(model: RGAN, photos: PhotoSet, device: str = "cpu") -> dict[str, float]:
    """The gate's figures on held-out photos (224×224 centre crops), every image with its own key."""
    figures = evaluate(model, load_classifier(TARGET), centre_crops(photos), kappa=PHOTO_CONFIG.kappa,
                       batch_size=EVAL_BATCH, device=device, key_seed=KEY_SEED)
    return {name: figures[name] for name in ("asr", "psnr_adv", "psnr_rec", "psnr_rec_wrong_key", "ssim_adv")}


def gate(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Why the new model must not replace the default (empty: it may)."""
    reasons = [f"{name} {after[name]:.4g} is below the default model's {before[name]:.4g}"
               for name in GATED if after[name] < before[name]]
    if after["psnr_rec_wrong_key"] > after["psnr_adv"] + WRONG_KEY_MARGIN_DB:
        reasons.append(f"a wrong key recovers {after['psnr_rec_wrong_key']:.2f} dB, more than "
                       f"{WRONG_KEY_MARGIN_DB:g} dB above the protected image's {after['psnr_adv']:.2f} dB")
    return reasons


def assess(workdir: Path, model: RGAN, device: str = "cpu") -> dict[str, Any]:
    """The report stored with the new model: both models' figures on the held-out photos, and the
    gate's verdict."""
    spec = json.loads((Path(workdir) / SPEC_NAME).read_text())
    holdout = load_photos(spec["holdout"])
    before = measure(default_model(), holdout, device)
    after = measure(model, holdout, device)
    reasons = gate(before, after)
    return {"holdout_photos": len(holdout), "training_photos": len(spec["train"]), "default": before,
            "finetuned": after, "activate": not reasons, "reasons": reasons}


# ---------------------------------------------------------------- one process of a torchrun

def _distributed_main(workdir: Path) -> int:
    """Runs this process's share of the run in `workdir` under torchrun; rank 0 reports progress
    to `progress.json`. A `stop` file or SIGTERM ends it between steps (exit 0 either way: the
    caller looks for the model file)."""
    from torch import distributed as dist

    spec = json.loads((workdir / SPEC_NAME).read_text())
    params = FinetuneParams.from_dict(spec["params"])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = "cpu"
    if params.device == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if params.device == "cuda" else "gloo")
    last = [0.0]

    def report(progress: dict[str, Any]) -> None:
        # rank 0 speaks for all (the losses are already averaged over the processes)
        due = time.monotonic() - last[0] >= 1.0 or progress["step"] == progress["steps"]
        if dist.get_rank() == 0 and due:
            last[0] = time.monotonic()
            write_text(workdir / PROGRESS_NAME, json.dumps(progress))

    try:
        train_run(workdir, params, device=device, on_progress=report,
                  stop=lambda: bool(stopping) or (workdir / STOP_NAME).exists())
    except TrainingStopped:
        pass
    finally:
        dist.destroy_process_group()
    return 0


def model_path(workdir: Path) -> Path:
    return Path(workdir) / MODEL_NAME


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / SPEC_NAME).is_file():
        sys.exit(f"usage: torchrun ... -m agent.finetune WORKDIR (a job's folder holding {SPEC_NAME})")
    sys.exit(_distributed_main(Path(sys.argv[1])))
