"""Renders `evaluation.run_evaluation`'s figures as a markdown report with matplotlib plots: ASR per
platform transform and per purifier (the paper's Fig. 7 and 8), PSNR distributions, Table 3, and an
image grid (original / protected / recovered / perturbation / error ×10, like the paper's Fig. 11).

The report is `out` (e.g. docs/evaluation.md); its plots and the raw figures (JSON) go to the
folder beside it named after it (docs/evaluation/). Every file is written atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import torch

from .atomic import atomic_path, write_text

# the goals of issue 7
GOAL_ASR_AFTER_PURIFIER = 0.70
GOAL_ATTACKER_PSNR = 35.0
GOAL_OWNER_PSNR = 45.0
DATASET_TITLES = {"photos": "Photos (imagenet-sample validation, MobileNetV2)",
                  "cifar10": "CIFAR-10 (held-back test images, ResNet-20)"}


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the evaluation report needs matplotlib: pip install 'rgan-agent[eval]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _bars(plt, path: Path, title: str, values: dict[str, float], goal: float | None = None) -> None:
    figure, axes = plt.subplots(figsize=(max(6, 0.55 * len(values)), 3.6))
    axes.bar(range(len(values)), [100 * v for v in values.values()], color="#4c72b0")
    axes.set_xticks(range(len(values)), list(values), rotation=40, ha="right", fontsize=8)
    axes.set_ylabel("ASR (%)")
    axes.set_ylim(0, 100)
    if goal is not None:
        axes.axhline(100 * goal, color="#c44e52", linestyle="--", linewidth=1, label=f"goal {100 * goal:.0f}%")
        axes.legend(fontsize=8)
    axes.set_title(title, fontsize=10)
    _save(figure, path)
    plt.close(figure)


def _distributions(plt, path: Path, title: str, per_image: dict[str, list[float]]) -> None:
    figure, axes = plt.subplots(figsize=(7, 3.6))
    for name, values in per_image.items():
        axes.hist(values, bins=30, alpha=0.55, label=name)
    axes.axvline(GOAL_ATTACKER_PSNR, color="#c44e52", linestyle="--", linewidth=1)
    axes.axvline(GOAL_OWNER_PSNR, color="#55a868", linestyle="--", linewidth=1)
    axes.set_xlabel("PSNR to the original (dB)")
    axes.set_ylabel("images")
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=10)
    _save(figure, path)
    plt.close(figure)


def _grid(plt, path: Path, samples: dict[str, torch.Tensor], epsilon: float) -> None:
    clean = samples["original"]
    columns = dict(samples)
    # the perturbation spans ±ε and the recovery error a few grey levels: stretched to be seen
    columns["perturbation (±ε → full range)"] = (samples["protected"] - clean) / (2 * epsilon) + 0.5
    columns["owner's error ×10"] = (samples["recovered"] - clean) * 10 + 0.5
    rows = len(clean)
    figure, axes = plt.subplots(rows, len(columns), figsize=(1.9 * len(columns), 1.9 * rows), squeeze=False)
    for column, (name, images) in enumerate(columns.items()):
        for row in range(rows):
            axes[row][column].imshow(images[row].clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[row][column].axis("off")
        axes[0][column].set_title(name, fontsize=7)
    _save(figure, path)
    plt.close(figure)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _goal(value: float, goal: float, at_least: bool, unit: str = "dB") -> str:
    met = value >= goal if at_least else value <= goal
    if met:
        return "met"
    shown = f"{100 * abs(goal - value):.1f} points" if unit == "%" else f"{abs(goal - value):.2f} dB"
    return f"**missed** by {shown}"


def _dataset_section(name: str, result: dict, folder: Path) -> str:
    goals = result["goals"]
    protection = result["protection"]
    parts = [f"## {DATASET_TITLES.get(name, name)}",
             f"{result['images']} held-back images, model `{result['model']}` "
             f"({'keyed: every image has its own key' if result['keyed'] else 'unkeyed: its R is public'}), "
             f"target classifier `{result['classifier']}`; {result['seconds']:.0f} s. Options: "
             + ", ".join(f"{k} = {v}" for k, v in result["options"].items() if k not in ("datasets", "device")) + ".",
             "### Goals",
             _table(["goal", "measured", ""], [
                 [f"ASR after the strongest purifier ≥ {GOAL_ASR_AFTER_PURIFIER:.0%}",
                  f"{_percent(goals['asr_after_strongest'])} ({goals['strongest_purifier']})",
                  _goal(goals["asr_after_strongest"], GOAL_ASR_AFTER_PURIFIER, True, "%")],
                 [f"best attacker's recovered PSNR ≤ {GOAL_ATTACKER_PSNR:.0f} dB",
                  f"{goals['best_attacker_psnr']:.2f} dB ({goals['best_attacker']})",
                  _goal(goals["best_attacker_psnr"], GOAL_ATTACKER_PSNR, False)],
                 [f"owner's recovered PSNR ≥ {GOAL_OWNER_PSNR:.0f} dB", f"{goals['owner_psnr']:.2f} dB",
                  _goal(goals["owner_psnr"], GOAL_OWNER_PSNR, True)],
             ]),
             "### Protection and recovery",
             _table(["", "PSNR (dB)", "L2", "ASR", "CER"], [
                 [kind, f"{f['psnr']:.2f}" if "psnr" in f else "", f"{f['l2']:.3f}" if "l2" in f else "",
                  _percent(f["asr"]) if "asr" in f else "", _percent(f["cer"]) if "cer" in f else ""]
                 for kind, f in protection.items()]),
             "### Platform transforms (Fig. 7)",
             "ASR: the share of images whose prediction on the transformed protected image differs from the "
             "prediction on the original transformed alike.",
             _table(["transform", "ASR"], [[t, _percent(f["asr"])] for t, f in result["platforms"].items()]),
             f"![ASR per platform transform]({folder.name}/{name}-platforms.png)",
             "### Purifiers (Fig. 8): the attackers' recovery",
             "Each applied to the protected images without the key. ASR: predictions still differing from the "
             "original's; PSNR and L2 to the original.",
             _table(["purifier", "PSNR (dB)", "L2", "ASR left", "CER", "training"], [
                 [p, f"{f['psnr']:.2f}", f"{f['l2']:.3f}", _percent(f["asr"]), _percent(f["cer"]) if "cer" in f else "",
                  f"{f['steps']} steps, {f['seconds']:.0f} s" if f["learned"] else "none (fixed transform)"]
                 for p, f in result["purifiers"].items()]),
             f"![ASR after each purifier]({folder.name}/{name}-purifiers.png)",
             f"![PSNR distributions]({folder.name}/{name}-psnr.png)"]
    if result["transfer"]:
        parts += ["### Transfer to classifiers not used in training",
                  _table(["classifier", "ASR"], [[c, _percent(v)] for c, v in result["transfer"].items()])]
    rows = []
    for attack, recoveries in result["table3"].items():
        for recovery, f in recoveries.items():
            rows.append([attack if recovery == "attacked" else "", recovery, f"{f['l2']:.3f}", f"{f['psnr']:.2f}",
                         _percent(f["cer"])])
    parts += ["### Table 3: adversarial examples and their recovery",
              "L2 and PSNR to the original image, CER the classifier's error rate against the true labels.",
              _table(["attack", "image", "L2", "PSNR (dB)", "CER"], rows),
              "### Samples (Fig. 11)",
              f"![original, protected, recovered, best attacker, perturbation, error]({folder.name}/{name}-grid.png)"]
    return "\n\n".join(parts)


def write_report(results: dict, samples: dict[str, dict[str, torch.Tensor]], out: Path,
                 command: str = "agent eval") -> list[Path]:
    """Writes the report, its plots and evaluation.json; returns the paths written. Data sets of
    an earlier report at `out` that this run did not measure are kept (`agent eval --data
    cifar10` refreshes one section), so data sets can also be evaluated by separate processes."""
    plt = pyplot()
    out = Path(out)
    folder = out.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    # two evaluations finishing together must not drop each other's section: the folder itself
    # is the lock, so no lock file is left among the report's files
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        return _write_locked(plt, results, samples, out, folder, command)
    finally:
        os.close(descriptor)


def _write_locked(plt, results: dict, samples: dict[str, dict[str, torch.Tensor]], out: Path, folder: Path,
                  command: str) -> list[Path]:
    written = []
    for name, result in results["datasets"].items():
        title = DATASET_TITLES.get(name, name)
        _bars(plt, folder / f"{name}-platforms.png", f"{title}: ASR per platform transform",
              {t: f["asr"] for t, f in result["platforms"].items()})
        _bars(plt, folder / f"{name}-purifiers.png", f"{title}: ASR left after each purifier",
              {p: f["asr"] for p, f in result["purifiers"].items()}, GOAL_ASR_AFTER_PURIFIER)
        _distributions(plt, folder / f"{name}-psnr.png", f"{title}: PSNR per image", result["psnr_per_image"])
        _grid(plt, folder / f"{name}-grid.png", samples[name], result["epsilon"])
        written += [folder / f"{name}-{kind}.png" for kind in ("platforms", "purifiers", "psnr", "grid")]
    earlier = folder / "evaluation.json"
    if earlier.exists():
        kept = json.loads(earlier.read_text()).get("datasets", {})
        results = {**results, "datasets": {**{n: r for n, r in kept.items() if n not in results["datasets"]},
                                           **results["datasets"]}}
    header = ["# Evaluation: what protection withstands",
              f"Generated by `{command}` (raw figures in `{folder.name}/evaluation.json`); each section "
              "names the options it was measured with."]
    write_text(folder / "evaluation.json", json.dumps(results, indent=1))
    write_text(out, "\n\n".join(header + [_dataset_section(n, r, folder) for n, r in results["datasets"].items()]) + "\n")
    return written + [folder / "evaluation.json", out]
