"""White-box ASR after k = 0, 1, 2, 4, 8 refinement steps, from G's proposal (the shipped photo
model) and from a keyed random start, at medium's bound and one attempt; with the noise control.
Writes bench/results/steps.json and its section of docs/benchmarks.md.

    .venv/bin/python bench/steps.py            # 24 imagenet-sample val photos (~3 min)
    .venv/bin/python bench/steps.py --limit 4  # a quick check that saves nothing
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.classifiers import load_mobilenet_v2  # noqa: E402
from agent.coupling import Coupling  # noqa: E402
from agent.data import photo_paths  # noqa: E402
from agent.images import read_image  # noqa: E402
from agent.pipeline import STRENGTHS, default_model, working_copy  # noqa: E402
from agent.refine import Budget, Refinement  # noqa: E402
from bench.quality import labels, noise_like, psnr  # noqa: E402
from bench.sections import run_photo_bench  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "steps.json"
REPORT = ROOT / "docs" / "benchmarks.md"
PHOTOS = 24
STEPS = (0, 1, 2, 4, 8)


def measure(limit: int | None) -> dict:
    torch.set_num_threads(2)
    white, medium = load_mobilenet_v2(), STRENGTHS["medium"]
    rng = np.random.default_rng(4)
    photos = []
    for path in photo_paths("imagenet-val")[-PHOTOS:][:limit]:
        image = working_copy(read_image(path))[..., :3]
        photos.append(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image)
    results: dict = {"photos": len(photos), "epsilon": medium.epsilon, "starts": {}}
    for start, model in (("G", default_model()), ("random", None)):
        rows = {}
        for steps in STEPS:
            fooled, noise, quality = [], [], []
            for original in photos:
                key = rng.bytes(32)
                budget = Budget(medium.epsilon, steps, medium.pattern)
                protected = Coupling(key, Refinement(key, budget, 255, model), medium.pattern, budget.reach).couple(original).pixels
                clean = labels(white, original)
                quality.append(psnr(protected, original))
                fooled.append((labels(white, protected) != clean).mean())
                noise.append((labels(white, noise_like(original, quality[-1], rng)) != clean).mean())
            rows[str(steps)] = {"asr": float(np.mean(fooled)), "noise": float(np.mean(noise)), "psnr": float(np.mean(quality))}
        results["starts"][start] = rows
    return results


def report(figures: dict) -> str:
    lines = ["## ASR after k steps, from G and from a random start", "",
             f"Written by `bench/steps.py`: {figures['photos']} imagenet-sample val photos, medium's bound "
             f"({figures['epsilon']:g} grey levels on the field's half), one attempt, white-box MobileNetV2 on both "
             "views; in brackets Gaussian noise of the same PSNR.", "",
             "| start | " + " | ".join(f"k = {k}" for k in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for start, rows in figures["starts"].items():
        cells = [f"{100 * rows[str(k)]['asr']:.1f}% ({100 * rows[str(k)]['noise']:.1f}%), {rows[str(k)]['psnr']:.1f} dB"
                 for k in STEPS]
        lines.append(f"| {start} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_photo_bench(__doc__, "steps", RESULTS, REPORT, measure, report)
