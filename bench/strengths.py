"""What each strength of the first model (the rgan scheme, whose records still recover; today's
protection is measured by bench/quality.py) does, and how the key holder's recovery refined with
G (`RGAN.refine_step`) compares with R alone. Writes
bench/results/strengths.json and its section of docs/benchmarks.md.

    OMP_NUM_THREADS=2 .venv/bin/python bench/strengths.py [--limit N]

imagenet-sample's last 200 photos as 224×224 centre crops, each protected with its own random key
(as the library does it: G's share scaled by the strength, plus the key pattern's), classified by
MobileNetV2, then recovered with the right key (R alone; R and then the library's refinement steps)
and with a wrong one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import metrics
from agent.classifiers import load_classifier
from agent.data import centre_crops, load_photos, to_float
from agent.pipeline import DEFAULT_MODEL_PATH, REFINE_STEPS, RGAN_STRENGTHS
from agent.rgan.keying import batch_patterns, random_keys
from agent.rgan.model import load_model, quantize
from bench.sections import run_photo_bench

RESULTS = ROOT / "bench" / "results" / "strengths.json"
REPORT = ROOT / "docs" / "benchmarks.md"
BATCH = 25


@torch.no_grad()
def measure(limit: int | None) -> dict:
    model, _ = load_model(DEFAULT_MODEL_PATH)
    classifier = load_classifier("imagenet-mobilenetv2")
    clean = to_float(centre_crops(load_photos("imagenet-val").subset(limit)).images)
    side = clean.shape[-1]
    right = batch_patterns(random_keys(len(clean), torch.Generator().manual_seed(31)), side, side)
    wrong = batch_patterns(random_keys(len(clean), torch.Generator().manual_seed(32)), side, side)

    def batched(function) -> torch.Tensor:
        return torch.cat([function(slice(i, i + BATCH)) for i in range(0, len(clean), BATCH)])

    clean_pred = batched(lambda s: classifier(clean[s]).argmax(1))
    started = time.perf_counter()
    figures = {}
    for name, strength in RGAN_STRENGTHS.items():
        protected = batched(lambda s: model.protect(clean[s], right[s], strength))
        by_r = batched(lambda s: quantize(model.recover(protected[s], right[s], strength)))
        refined = batched(lambda s: quantize(model.recover(protected[s], right[s], strength, refine=REFINE_STEPS)))
        guessed = batched(lambda s: quantize(model.recover(protected[s], wrong[s], strength, refine=REFINE_STEPS)))
        figures[name] = {
            "strength": strength,
            "asr": metrics.attack_success_rate(batched(lambda s: classifier(protected[s]).argmax(1)), clean_pred),
            "psnr_protected": metrics.psnr(protected, clean).mean().item(),
            "psnr_r_alone": metrics.psnr(by_r, clean).mean().item(),
            "psnr_refined": metrics.psnr(refined, clean).mean().item(),
            "psnr_wrong_key": metrics.psnr(guessed, clean).mean().item(),
        }
    return {"images": len(clean), "refine_steps": REFINE_STEPS, "threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - started, "strengths": figures}


def report(results: dict) -> str:
    rows = "\n".join(
        f"| {name} (×{f['strength']}) | {100 * f['asr']:.1f}% | {f['psnr_protected']:.2f} dB | {f['psnr_r_alone']:.2f} dB "
        f"| {f['psnr_refined']:.2f} dB | {f['psnr_wrong_key']:.2f} dB |" for name, f in results["strengths"].items())
    return f"""## Strengths, and recovery refined with G

Written by `bench/strengths.py` from `bench/results/strengths.json`; do not edit by hand.
{results['images']} held-back photos (imagenet-sample val, 224×224 centre crops), each with its own random
key, MobileNetV2; {results['threads']} CPU threads, {results['seconds']:.0f} s. The strength scales G's share
of the perturbation; the key pattern's share is the same at every strength. "Refined" is the library's
recovery: R's estimate, then {results['refine_steps']} fixed-point steps with G (`RGAN.refine_step`); the wrong
key gets the same refinement.

| strength | ASR | protected PSNR | recovered, R alone | recovered, refined | wrong key, refined |
|---|---|---|---|---|---|
{rows}
"""


def main() -> None:
    run_photo_bench(__doc__, "strengths", RESULTS, REPORT, measure, report)


if __name__ == "__main__":
    main()
