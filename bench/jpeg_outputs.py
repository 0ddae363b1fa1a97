"""Recovery from the first model's JPEG outputs (the rgan scheme, whose records still recover;
today's protection is measured by bench/quality.py): how close the owner gets to the original from a
protected photo saved as a JPEG (4:4:4, as `agent protect` writes a JPEG original), subtracting
the perturbation alone and with the file's quantisation tables (`agent/jpeg.py`). Writes
bench/results/jpeg_outputs.json and its section of docs/benchmarks.md.

    OMP_NUM_THREADS=2 .venv/bin/python bench/jpeg_outputs.py [--limit N]

Held-back photos at full size (imagenet-sample's last 200, bsds500 test), each protected through
the library with its own random key at its working resolution, encoded at each quality, decoded
and recovered with the right key. "Original as JPEG" is the same quality applied to the
unprotected photo: what an unprotected upload loses to the codec alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import images, pipeline
from agent.data import load_photos
from agent.jpeg import Quantization
from agent.rgan.keying import random_keys
from bench.sections import run_photo_bench

RESULTS = ROOT / "bench" / "results" / "jpeg_outputs.json"
REPORT = ROOT / "docs" / "benchmarks.md"
QUALITIES = (90, 92, 95)
TARGET_DB = 38.0
SETS = {"imagenet-val": 41, "bsds-test": 42}  # data set → seed of its keys


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255.0**2 / error)


def summary(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {"mean": float(array.mean()), "median": float(np.median(array)), "min": float(array.min()),
            "share_at_target": float(np.mean(array >= TARGET_DB))}


def measure_set(name: str, seed: int, limit: int | None) -> dict:
    photos = load_photos(name).subset(limit)
    keys = random_keys(len(photos.images), torch.Generator().manual_seed(seed))
    wrong_keys = random_keys(len(photos.images), torch.Generator().manual_seed(seed + 100))
    model = pipeline.default_model()
    rows: dict[int, dict[str, list[float]]] = {q: {"original": [], "plain": [], "tables": [], "wrong_key": []} for q in QUALITIES}
    seconds = []
    for image, key, wrong in zip(photos.images, keys, wrong_keys):
        original = pipeline.working_copy(image.permute(1, 2, 0).numpy())
        protected, info = pipeline.protect_rgan(original, key, model=model)
        for quality in QUALITIES:
            data = images.encode_image(protected, "JPEG", quality=quality)
            decoded = images.decode_image(data)
            rows[quality]["original"].append(psnr(images.decode_image(
                images.encode_image(original, "JPEG", quality=quality)), original))
            rows[quality]["plain"].append(psnr(pipeline.recover(decoded, key, info, model), original))
            started = time.perf_counter()
            tables = Quantization.read(data)
            recovered = pipeline.recover(decoded, key, info, model, jpeg=tables)
            seconds.append(time.perf_counter() - started)
            rows[quality]["tables"].append(psnr(recovered, original))
            rows[quality]["wrong_key"].append(psnr(pipeline.recover(decoded, wrong, info, model, jpeg=tables), original))
    return {"photos": len(photos.images), "recover_seconds_median": float(np.median(seconds)),
            "qualities": {str(q): {kind: summary(v) for kind, v in r.items()} for q, r in rows.items()}}


def measure(limit: int | None) -> dict:
    started = time.perf_counter()
    sets = {name: measure_set(name, seed, limit) for name, seed in SETS.items()}
    return {"threads": torch.get_num_threads(), "seconds": time.perf_counter() - started,
            "target_db": TARGET_DB, "sets": sets}


def report(results: dict) -> str:
    lines = []
    for name, figures in results["sets"].items():
        for quality, kinds in figures["qualities"].items():
            original, plain, tables, wrong = kinds["original"], kinds["plain"], kinds["tables"], kinds["wrong_key"]
            lines.append(
                f"| {name} ({figures['photos']}) | {quality} | {original['mean']:.2f} dB | {plain['mean']:.2f} dB "
                f"| {tables['mean']:.2f} dB | {tables['median']:.2f} dB | {tables['min']:.2f} dB "
                f"| {100 * plain['share_at_target']:.0f}% → {100 * tables['share_at_target']:.0f}% "
                f"| {wrong['mean']:.2f} dB |")
    rows = "\n".join(lines)
    seconds = ", ".join(f"{name} {f['recover_seconds_median']:.2f} s" for name, f in results["sets"].items())
    return f"""## Recovery from JPEG outputs

Written by `bench/jpeg_outputs.py` from `bench/results/jpeg_outputs.json`; do not edit by hand.
Held-back photos at full size, each protected with its own random key at its working resolution,
saved as a JPEG at each quality (4:4:4, as the agent writes them), recovered with the right key.
PSNR against the unprotected photo. "Plain" subtracts the perturbation (R, then the refinement
steps); "with the tables" then estimates the original within the bounds the file's quantisation
leaves (`agent/jpeg.py`), which is what `agent recover` does with a JPEG. "Wrong key" recovers
the same way with another random key. {results['threads']} CPU
threads, {results['seconds']:.0f} s; median recovery with the tables per photo: {seconds}.

| photos | JPEG quality | original as JPEG | plain | with the tables (mean) | median | min | ≥ {results['target_db']:.0f} dB: plain → tables | wrong key, with the tables |
|---|---|---|---|---|---|---|---|---|
{rows}
"""


def main() -> None:
    run_photo_bench(__doc__, "jpeg_outputs", RESULTS, REPORT, measure, report)


if __name__ == "__main__":
    main()
