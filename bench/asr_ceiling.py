"""Why the CIFAR-10 reproduction's ASR stops short of 95%: where the shipped model's protected images
go, and how much attack its generator leaves unused. Writes the section "asr_ceiling" of
docs/benchmarks.md and bench/results/asr_ceiling.json.

    .venv/bin/python bench/asr_ceiling.py [--model agent/weights/cifar10-rgan.safetensors]

Three measurements, on the 2,000 held-back images and on the 8,000 training images:
- ASR per class, and the class the protected images are sent to: a small G learns one
  destination for nearly everything, so images of that class itself are the ones it cannot move;
- the sign of G's mean perturbation alone, at the full bound (one pattern for every image);
- G's own directions pushed to the full bound (the sign of its perturbation at ±ε): what more
  magnitude buys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import metrics  # noqa: E402
from agent.classifiers import load_classifier  # noqa: E402
from agent.atomic import write_text  # noqa: E402
from agent.data import CIFAR_CLASSES as CLASSES, load_cifar10, to_float  # noqa: E402
from agent.evaluation import CIFAR_MODEL_PATH  # noqa: E402
from agent.rgan.model import RGAN, load_model, quantize  # noqa: E402
from bench.sections import write_section  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "asr_ceiling.json"
REPORT = ROOT / "docs" / "benchmarks.md"
BATCH = 500


def batched(function, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([function(images[start : start + BATCH]) for start in range(0, len(images), BATCH)])


@torch.no_grad()
def measure(model: RGAN, classifier: torch.nn.Module, clean: torch.Tensor, labels: torch.Tensor) -> dict:
    """`clean`: [0, 1] images; `labels`: their true classes, which group the per-class figures."""
    eps = model.config.epsilon
    # G's share as a fraction of the bound
    share = batched(lambda x: model.learned_perturbation(x) / eps, clean)
    predict = lambda images: batched(lambda x: classifier(x).argmax(1), images)  # noqa: E731
    before = predict(clean)

    def attack(perturbation: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        protected = quantize(clean + perturbation)
        after = predict(protected)
        return metrics.attack_success_rate(after, before), metrics.psnr(protected, clean).mean().item(), after

    asr, psnr, after = attack(eps * share)
    universal = eps * share.mean(0, keepdim=True).sign().expand_as(share)
    per_class = {}
    for label in labels.unique().tolist():
        rows = labels == label
        destinations = torch.bincount(after[rows], minlength=len(CLASSES))
        per_class[CLASSES[label]] = {
            "images": int(rows.sum()),
            "asr": metrics.attack_success_rate(after[rows], before[rows]),
            "sent_to": {CLASSES[c]: int(n) for c, n in enumerate(destinations.tolist()) if n},
        }
    universal_asr, universal_psnr, _ = attack(universal)
    full_asr, full_psnr, _ = attack(eps * share.sign())
    return {
        "images": len(clean),
        "asr": asr, "psnr": psnr,
        "per_class": per_class,
        "universal_sign": {"asr": universal_asr, "psnr": universal_psnr},
        "full_bound": {"asr": full_asr, "psnr": full_psnr},
        "share_at_bound": (share.abs() > 0.95).float().mean().item(),
    }


def relative(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(figures: dict) -> str:
    lines = ["## Where the CIFAR-10 attack sends images, and what it leaves unused", "",
             "Classifier `cifar-resnet20`, protected images rounded to 8 bits; "
             "`bench/asr_ceiling.py --model …` regenerates this section.", "",
             "| model | images | G's perturbation | its sign averaged over images, at ±ε | "
             "G's directions at the full bound |", "|---|---|---|---|---|"]
    for model, splits in figures.items():
        for name, split in splits.items():
            lines.append(
                f"| `{model}` | {name} ({split['images']:,}) | {100 * split['asr']:.1f}% ASR, {split['psnr']:.2f} dB | "
                f"{100 * split['universal_sign']['asr']:.1f}% ASR, {split['universal_sign']['psnr']:.2f} dB | "
                f"{100 * split['full_bound']['asr']:.1f}% ASR, {split['full_bound']['psnr']:.2f} dB |")
    lines += ["", "Per class: ASR, and the classes the protected images are classified as (the three most common).", "",
              "| model | class | images | ASR | classified as after protection |", "|---|---|---|---|---|"]
    for model, splits in figures.items():
        for name, split in splits.items():
            for label, row in split["per_class"].items():
                total = sum(row["sent_to"].values())
                top = sorted(row["sent_to"].items(), key=lambda item: -item[1])[:3]
                sent = ", ".join(f"{c} {100 * n / total:.0f}%" for c, n in top)
                lines.append(f"| `{model}` | {label} ({name}) | {row['images']} | {100 * row['asr']:.1f}% | {sent} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, nargs="+", default=[CIFAR_MODEL_PATH], help="model files to measure")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved JSON")
    args = parser.parse_args()
    if args.report_only:
        figures = json.loads(RESULTS.read_text())
    else:
        classifier = load_classifier("cifar-resnet20")
        splits = {name: load_cifar10(split) for name, split in (("held back", "test"), ("training", "train"))}
        figures = {}
        for path in args.model:
            model, _ = load_model(path)
            figures[relative(path)] = {name: measure(model.eval(), classifier, to_float(data.images), data.labels)
                                       for name, data in splits.items()}
        write_text(RESULTS, json.dumps(figures, indent=2))
    text = report(figures)
    write_section(REPORT, "asr_ceiling", text)
    print(text)


if __name__ == "__main__":
    main()
