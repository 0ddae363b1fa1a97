"""The attacker's side, measured (issue 7): how much of a protection survives what platforms do to
uploads and what attackers do to undo it, and how the owner's keyed recovery compares with the
attackers' purifiers. `run_evaluation` computes every figure as plain data (plus a few sample
images for the report); `evaluation_report` renders them.

The protocol, for each data set (photos: imagenet-sample's last 200 as 224×224 centre crops with
MobileNetV2; CIFAR-10: the 2,000 held-back test images with ResNet-20):
- every held-back image is protected with its own key, drawn from a seed that neither the model's
  training nor any attacker used;
- the attackers have the public code and weights and the training split, not the keys: they make
  their training pairs by protecting their own crops with keys of their own, and by attacking the
  classifier themselves (`adversaries.pairs`);
- ASR after a transform or purifier counts the images whose prediction still differs from the
  prediction on the (equally transformed) original.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import metrics
from .adversaries import attacks
from .adversaries.apegan import train_apegan
from .adversaries.defense_gan import train_defense_gan
from .adversaries.input_transforms import INPUT_TRANSFORMS
from .adversaries.keyless import protect_with_unseen_keys, train_keyless
from .adversaries.nrp import train_nrp
from .adversaries.pairs import AttackPairs, MixedPairs, ProtectedPairs, image_list
from .adversaries.robust_recovery import train_robust_recovery
from .classifiers import feature_extractor, load_classifier
from .data import TRAIN_SHORT_SIDE, ImageSet, PhotoSet, centre_crops, load_cifar10, load_photos
from .pipeline import DEFAULT_MODEL_PATH, REFINE_STEPS
from .platforms import PLATFORM_TRANSFORMS
from .rgan.keying import batch_patterns, random_keys
from .rgan.model import RGAN, load_model, quantize
from .rgan.transforms import platform_view

DATASETS = ("photos", "cifar10")
CIFAR_MODEL_PATH = Path(__file__).resolve().parent / "weights" / "cifar10-rgan.safetensors"
TRANSFER = {"photos": (), "cifar10": ("cifar-resnet32", "cifar-resnet44", "cifar-resnet56")}
TABLE3_ATTACKS = ("DDN", "PGD", "C&W")
# the keyed model's perturbations differ per key, so the held-back images get keys from a seed
# that neither training (seed 0) nor the attackers (options.seed + 1) draw from
OWNER_KEY_SEED = 12345
BATCH = {"photos": 8, "cifar10": 250}
# a platform's 2048-px resize makes any image 50 MB of floats: transforms go a few images at a time
TRANSFORM_BATCH = 8


@dataclass(frozen=True)
class EvalOptions:
    """The defaults are sized for a CPU in about an hour; a GPU takes more images and steps."""

    datasets: tuple[str, ...] = DATASETS
    images: int | None = None  # held-back images per data set (None: all)
    attack_images: int = 50  # of those, how many Table 3's DDN, PGD and C&W attack
    purifier_steps: int = 600
    batch_size: int = 16
    attack_steps: int = 30  # iterations of DDN and C&W in Table 3 (PGD: 10)
    projection_steps: int = 50  # Defense-GAN's L
    restarts: int = 4  # Defense-GAN's R
    photo_model: Path | None = None  # default: the shipped photo model
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.datasets) - set(DATASETS)
        if unknown or not self.datasets:
            raise ValueError(f"datasets must be some of {', '.join(DATASETS)}, got {', '.join(self.datasets) or 'none'}")
        for name in ("attack_images", "purifier_steps", "batch_size", "attack_steps", "projection_steps", "restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.images is not None and self.images < 1:
            raise ValueError(f"images must be at least 1, got {self.images}")


@dataclass
class Setting:
    """One data set's side of the evaluation: the protection model, the classifier it is meant to
    fool, and the images on both sides of the split."""

    name: str
    model: RGAN
    model_name: str
    classifier: nn.Module
    classifier_name: str
    held_back: ImageSet  # uint8, at the classifier's input size
    train: ImageSet | PhotoSet
    crop: int  # purifiers train on crops of this side
    defense_gan_size: int
    transfer: dict[str, nn.Module]
    batch: int

    @property
    def side(self) -> int:
        return self.held_back.images.shape[-1]


def load_setting(name: str, options: EvalOptions) -> Setting:
    if name == "photos":
        path = Path(options.photo_model) if options.photo_model else DEFAULT_MODEL_PATH
        model, _ = load_model(path)
        classifier_name = "imagenet-mobilenetv2"
        held_back = centre_crops(load_photos("imagenet-val"))
        train, crop, size = load_photos("train", TRAIN_SHORT_SIDE), 96, 64
    elif name == "cifar10":
        path = CIFAR_MODEL_PATH
        model, _ = load_model(path)
        classifier_name = "cifar-resnet20"
        held_back, train, crop, size = load_cifar10("test"), load_cifar10("train"), 32, 32
    else:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return Setting(
        name=name, model=model, model_name=Path(path).name, classifier=load_classifier(classifier_name),
        classifier_name=classifier_name, held_back=held_back.subset(options.images), train=train, crop=crop,
        defense_gan_size=size, transfer={n: load_classifier(n) for n in TRANSFER[name]}, batch=BATCH[name],
    )


def _batched(function: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([function(images[i : i + size]) for i in range(0, len(images), size)])


def _view(setting: Setting, images: torch.Tensor) -> torch.Tensor:
    """What the classifier is given after a platform changed an image's size: its standard view
    (photos: shorter side 256, centre 224; CIFAR: back to 32×32)."""
    if images.shape[-2:] == (setting.side, setting.side):
        return images
    if setting.name == "photos":
        return platform_view(images, "crop")
    return F.interpolate(images, size=(setting.side,) * 2, mode="bilinear", antialias=True, align_corners=False)


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


@torch.no_grad()
def _predict(setting: Setting, images: torch.Tensor, transform: Callable = _identity,
             classifier: nn.Module | None = None) -> torch.Tensor:
    classifier = classifier or setting.classifier
    return _batched(lambda x: classifier(_view(setting, transform(x))).argmax(1), images,
                    setting.batch if transform is _identity else TRANSFORM_BATCH)


def _image_figures(images: torch.Tensor, clean: torch.Tensor, predictions: torch.Tensor,
                   clean_predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    figures = {
        "psnr": metrics.psnr(images, clean).mean().item(),
        "l2": metrics.l2(images, clean).mean().item(),
        "asr": metrics.attack_success_rate(predictions, clean_predictions),
    }
    if (labels >= 0).all():
        figures["cer"] = metrics.error_rate(predictions, labels)
    return figures


def train_purifiers(setting: Setting, options: EvalOptions, on_progress: Callable[[str], None]) -> dict:
    """The attackers' learned purifiers, each trained on the training split for
    `options.purifier_steps` batches. APE-GAN++ and Robust Recovery learn from a mix of protected
    and PGD-attacked crops (several attack types, as their papers train); NRP makes its own
    self-supervised perturbations and Defense-GAN learns the clean images only."""
    protected = ProtectedPairs(setting.model, image_list(setting.train), setting.crop)
    pgd = AttackPairs(setting.classifier, image_list(setting.train), setting.crop, partial(attacks.pgd, steps=5))
    mixed = MixedPairs([protected, pgd])
    features = feature_extractor(setting.classifier)
    common = {"batch_size": options.batch_size, "seed": options.seed + 1, "device": options.device}
    trainers = {
        "APE-GAN++": lambda: train_apegan(mixed, options.purifier_steps, classifier=setting.classifier, **common),
        "Robust Recovery": lambda: train_robust_recovery(
            mixed, options.purifier_steps, classifier=setting.classifier, feature_net=features, **common),
        "NRP": lambda: train_nrp(protected, options.purifier_steps, feature_net=features, **common),
        "Defense-GAN": lambda: train_defense_gan(
            protected, options.purifier_steps, size=setting.defense_gan_size, **common),
    }
    if setting.model.config.keyed:
        # R's own architecture without the key: what the public weights suggest first
        trainers["key-less R"] = lambda: train_keyless(
            setting.model, setting.train, options.purifier_steps, options.batch_size, setting.crop, seed=options.seed + 1)
    purifiers = {}
    for name, trainer in trainers.items():
        on_progress(f"{setting.name}: training {name} ({options.purifier_steps} steps)")
        module, info = trainer()
        if name == "Defense-GAN":
            module.projection_steps, module.restarts = options.projection_steps, options.restarts
        purifiers[name] = (module.eval(), {"steps": info["steps"], "seconds": round(info["seconds"], 1)})
    return purifiers


def _apply(setting: Setting, purifier: Callable, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return quantize(_batched(purifier, images, setting.batch))


def evaluate_setting(setting: Setting, options: EvalOptions, on_progress: Callable[[str], None]
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every figure for one data set, and sample images for the report's grid."""
    started = time.perf_counter()
    model, labels = setting.model.eval(), setting.held_back.labels
    on_progress(f"{setting.name}: protecting {len(setting.held_back)} held-back images")
    clean, adversarial, pattern = protect_with_unseen_keys(model, setting.held_back.images, seed=OWNER_KEY_SEED)
    with torch.no_grad():
        def recover(key_pattern, refine):
            chunks = [model.recover(adversarial[i : i + setting.batch],
                                    None if key_pattern is None else key_pattern[i : i + setting.batch],
                                    refine=refine)
                      for i in range(0, len(adversarial), setting.batch)]
            return quantize(torch.cat(chunks))

        # a keyed model's owner recovers as the library does (R, then G's fixed-point steps); an
        # unkeyed model is recovered by R alone, the paper's recovery, as the reproduction measures it
        refine = REFINE_STEPS if pattern is not None else 0
        recovered = recover(pattern, refine)
        wrong = by_r_alone = None
        if pattern is not None:
            by_r_alone = recover(pattern, 0)
            wrong_keys = random_keys(len(clean), torch.Generator().manual_seed(OWNER_KEY_SEED + 1))
            wrong = recover(batch_patterns(wrong_keys, *clean.shape[-2:]), refine)
    clean_pred, adv_pred = _predict(setting, clean), _predict(setting, adversarial)
    result: dict = {
        "images": len(clean), "model": setting.model_name, "classifier": setting.classifier_name,
        "keyed": model.config.keyed, "epsilon": model.config.epsilon,
    }
    protection = {
        "protected": _image_figures(adversarial, clean, adv_pred, clean_pred, labels),
        "recovered with the key" if pattern is not None else "recovered by R":
            _image_figures(recovered, clean, _predict(setting, recovered), clean_pred, labels),
    }
    if (labels >= 0).all():
        protection["original"] = {"cer": metrics.error_rate(clean_pred, labels)}
    if wrong is not None:
        protection["recovered with the key, R alone"] = _image_figures(
            by_r_alone, clean, _predict(setting, by_r_alone), clean_pred, labels)
        protection["recovered with a wrong key"] = _image_figures(wrong, clean, _predict(setting, wrong), clean_pred, labels)
    result["protection"] = protection
    distributions = {"protected": metrics.psnr(adversarial, clean), "recovered with the key": metrics.psnr(recovered, clean)}

    on_progress(f"{setting.name}: {len(PLATFORM_TRANSFORMS)} platform transforms")
    result["platforms"] = {
        name: {"asr": metrics.attack_success_rate(_predict(setting, adversarial, transform),
                                                  _predict(setting, clean, transform))}
        for name, transform in PLATFORM_TRANSFORMS.items()
    }
    result["transfer"] = {
        name: metrics.attack_success_rate(_predict(setting, adversarial, classifier=classifier),
                                          _predict(setting, clean, classifier=classifier))
        for name, classifier in setting.transfer.items()
    }

    purifiers = train_purifiers(setting, options, on_progress)
    every = {**{name: module for name, (module, _) in purifiers.items()}, **INPUT_TRANSFORMS}
    result["purifiers"], outputs = {}, {}
    for name, purifier in every.items():
        on_progress(f"{setting.name}: purifying with {name}")
        outputs[name] = _apply(setting, purifier, adversarial)
        result["purifiers"][name] = {
            **_image_figures(outputs[name], clean, _predict(setting, outputs[name]), clean_pred, labels),
            "learned": name in purifiers, **(purifiers[name][1] if name in purifiers else {}),
        }
    best = max(result["purifiers"], key=lambda name: result["purifiers"][name]["psnr"])
    strongest = min(result["purifiers"], key=lambda name: result["purifiers"][name]["asr"])
    distributions[f"best attacker ({best})"] = metrics.psnr(outputs[best], clean)
    if wrong is not None:
        distributions["recovered with a wrong key"] = metrics.psnr(wrong, clean)
    result["psnr_per_image"] = {name: [round(v, 2) for v in values.tolist()] for name, values in distributions.items()}

    result["table3"] = table3(setting, options, {name: module for name, (module, _) in purifiers.items()},
                              clean, adversarial, recovered, on_progress)
    owner = protection.get("recovered with the key", protection.get("recovered by R"))
    result["goals"] = {
        "strongest_purifier": strongest,
        "asr_after_strongest": result["purifiers"][strongest]["asr"],
        "best_attacker": best,
        "best_attacker_psnr": result["purifiers"][best]["psnr"],
        "owner_psnr": owner["psnr"],
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    samples = {"original": clean[:4], "protected": adversarial[:4], "recovered": recovered[:4],
               f"best attacker ({best})": outputs[best][:4]}
    return result, samples


def table3(setting: Setting, options: EvalOptions, purifiers: dict[str, nn.Module], clean: torch.Tensor,
           adversarial: torch.Tensor, recovered: torch.Tensor, on_progress: Callable[[str], None]) -> dict:
    """The paper's Table 3: adversarial examples of DDN, PGD and C&W, and RGAN's own, each as
    attacked and after each recovery: L2 and PSNR to the original, and the classifier's error rate
    (CER; where labels are unknown, against its predictions on the originals)."""
    count = min(options.attack_images, len(clean))
    clean = clean[:count]
    labels = setting.held_back.labels[:count]
    clean_pred = _predict(setting, clean)
    targets = labels if (labels >= 0).all() else clean_pred
    steps = options.attack_steps
    attack_functions = {
        "DDN": partial(attacks.ddn, steps=steps),
        "PGD": partial(attacks.pgd, steps=10, generator=torch.Generator().manual_seed(options.seed)),
        "C&W": partial(attacks.carlini_wagner, steps=steps),
    }

    def row(images: torch.Tensor) -> dict[str, float]:
        figures = _image_figures(images, clean, _predict(setting, images), clean_pred, targets)
        figures.setdefault("cer", metrics.error_rate(_predict(setting, images), targets))
        return {key: figures[key] for key in ("l2", "psnr", "cer")}

    table = {}
    for name, attack in attack_functions.items():
        on_progress(f"{setting.name}: Table 3, {name} on {count} images")
        attacked = torch.cat([attack(setting.classifier, clean[i : i + setting.batch], targets[i : i + setting.batch])
                              for i in range(0, count, setting.batch)])
        table[name] = {"attacked": row(attacked),
                       **{p: row(_apply(setting, purifier, attacked)) for p, purifier in purifiers.items()}}
    rgan = adversarial[:count]
    table["RGAN"] = {"attacked": row(rgan), "owner's recovery": row(recovered[:count]),
                     **{p: row(_apply(setting, purifier, rgan)) for p, purifier in purifiers.items()}}
    return table


def run_evaluation(options: EvalOptions, on_progress: Callable[[str], None] = lambda message: None,
                   settings: list[Setting] | None = None) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Every data set's figures, keyed by data set, with the options they were made with.
    `settings` replaces the data sets of `options` (tests pass small ones)."""
    torch.manual_seed(options.seed)
    settings = settings if settings is not None else [load_setting(name, options) for name in options.datasets]
    results: dict = {"datasets": {}}
    samples = {}
    for setting in settings:
        result, samples[setting.name] = evaluate_setting(setting, options, on_progress)
        result["options"] = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()}
        results["datasets"][setting.name] = result
    return results, samples


def evaluate_and_report(options: EvalOptions, out: Path, on_progress: Callable[[str], None] = lambda message: None,
                        command: str = "agent eval") -> dict:
    """`run_evaluation`, then its report at `out` (see `evaluation_report.write_report`)."""
    from .evaluation_report import pyplot, write_report

    pyplot()  # refuse before an hour of work, not after it, when matplotlib is missing
    results, samples = run_evaluation(options, on_progress)
    write_report(results, samples, out, command)
    return results
