"""Measures a trained RGAN on held-back images (paper §4.2): distortion and classifier metrics for
the protected and the recovered images, the four losses, and transfer to other classifiers.

Protected and recovered images are rounded to 8 bits first, as they would be in a file. A keyed
model protects every image with its own random key; recovery is measured with that key and, to
show that only the key holder can recover, with another random key (`psnr_rec_wrong_key`).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import metrics
from ..data import ImageSet, to_float
from . import losses
from .keying import batch_patterns, random_keys
from .model import RGAN, quantize


@torch.no_grad()
def evaluate(
    model: RGAN,
    target: nn.Module,
    data: ImageSet,
    kappa: float = 5.0,
    transfer: dict[str, nn.Module] | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    key_seed: int = 0,
) -> dict[str, float]:
    model = model.to(device).eval()
    eps = model.config.epsilon
    transfer = transfer or {}
    parts: dict[str, list[torch.Tensor]] = {}
    loss_sums = {"L_G_adv": 0.0, "L_G_mse": 0.0, "L_R_adv": 0.0, "L_R_mse": 0.0}

    def keep(name: str, value: torch.Tensor) -> None:
        parts.setdefault(name, []).append(value.cpu())

    keys = torch.Generator().manual_seed(key_seed)
    for start in range(0, len(data), batch_size):
        clean = to_float(data.images[start : start + batch_size]).to(device)
        pattern = wrong = None
        if model.config.keyed:
            pattern = batch_patterns(random_keys(len(clean), keys), *clean.shape[-2:]).to(device)
            wrong = batch_patterns(random_keys(len(clean), keys), *clean.shape[-2:]).to(device)
        adversarial = model.protect(clean, pattern)  # already on the 8-bit grid
        recovered = quantize(model.recover(adversarial, pattern))
        if wrong is not None:
            keep("psnr_rec_wrong_key", metrics.psnr(quantize(model.recover(adversarial, wrong)), clean))
        weight = len(clean) / len(data)
        logits = {kind: target(image) for kind, image in
                  (("clean", clean), ("adv", adversarial), ("rec", recovered))}
        clean_pred = logits["clean"].argmax(1)
        loss_sums["L_G_adv"] += weight * losses.cw_margin(logits["adv"], clean_pred, kappa).item()
        loss_sums["L_G_mse"] += weight * losses.distortion(adversarial, clean, eps).item()
        loss_sums["L_R_adv"] += weight * losses.recover_adv(logits["rec"], clean_pred).item()
        loss_sums["L_R_mse"] += weight * losses.distortion(recovered, clean, eps).item()
        for kind in ("clean", "adv", "rec"):
            keep(f"pred_{kind}", logits[kind].argmax(1))
        for kind, image in (("adv", adversarial), ("rec", recovered)):
            keep(f"psnr_{kind}", metrics.psnr(image, clean))
            keep(f"ssim_{kind}", metrics.ssim(image, clean))
            keep(f"l2_{kind}", metrics.l2(image, clean))
        for name, classifier in transfer.items():
            keep(f"transfer_clean_{name}", classifier(clean).argmax(1))
            keep(f"transfer_adv_{name}", classifier(adversarial).argmax(1))

    got = {name: torch.cat(values) for name, values in parts.items()}
    labels = data.labels
    result = dict(loss_sums)
    result["asr"] = metrics.attack_success_rate(got["pred_adv"], got["pred_clean"])
    result["rec_same_prediction"] = 1 - metrics.attack_success_rate(got["pred_rec"], got["pred_clean"])
    if (labels >= 0).all():
        for kind in ("clean", "adv", "rec"):
            result[f"acc_{kind}"] = metrics.accuracy(got[f"pred_{kind}"], labels)
            result[f"cer_{kind}"] = metrics.error_rate(got[f"pred_{kind}"], labels)
    for kind in ("adv", "rec"):
        for metric in ("psnr", "ssim", "l2"):
            result[f"{metric}_{kind}"] = got[f"{metric}_{kind}"].mean().item()
    if "psnr_rec_wrong_key" in got:
        result["psnr_rec_wrong_key"] = got["psnr_rec_wrong_key"].mean().item()
    for name in transfer:
        result[f"asr_{name}"] = metrics.attack_success_rate(
            got[f"transfer_adv_{name}"], got[f"transfer_clean_{name}"])
    return result
